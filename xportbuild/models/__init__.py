"""Exportable wrappers, one module per task kind."""
