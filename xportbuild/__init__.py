"""xportbuild: Hugging Face models to verified ExecuTorch programs, as cached build targets."""

__version__ = "0.1.0"
