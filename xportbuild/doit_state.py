"""doit's own state file, kept as bookkeeping: xportbuild decides what is up to date from its cache, so a state file
that cannot be written (a full or read-only disk) is one warning, not doit's traceback. doit's backend `xportbuild`,
registered through doit's plug-in entry points (pyproject.toml, `doit.BACKEND`)."""

from __future__ import annotations

import sqlite3
import sys

from doit.dependency import SqliteDB


class StateDB(SqliteDB):
    """doit's sqlite3 backend whose failed writes are reported in one line, once."""

    desc = "sqlite3, a failed write one warning (what is built lives in xportbuild's cache)"
    _warned = False

    def dump(self):
        self._written(super().dump)

    def remove(self, task_id):
        self._written(super().remove, task_id)

    def remove_all(self):
        self._written(super().remove_all)

    def _written(self, write, *args) -> None:
        try:
            write(*args)
        except (sqlite3.Error, OSError) as err:
            if not self._warned:
                sys.stderr.write(f"WARNING doit's state file {self.name} could not be written ({err}); what was "
                                 "built is kept in xportbuild's cache, which decides what is up to date: free disk "
                                 "space or fix permissions\n")
            self._warned = True
