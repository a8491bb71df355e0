"""Writes on their way to MLflow, and the journal that keeps them while MLflow fails.

The durability rule lives here, in `WriteQueue.submit`: when it returns, the
write is in MLflow or in the journal on disk, never only in memory. So a sweep
killed during an MLflow outage loses nothing that Tune reported; `--resume`
(or the next flush, once MLflow is back) writes what waits.
"""

from __future__ import annotations

import json
import sys
import time

from search.storage import StoredFile
from search.tracking.store import TRACKING_ERRORS
from search.tracking.writer import MlflowWriter, Operation
from trainables.errors import first_line


class Journal:
    """The waiting operations, as one JSON file in the sweep's folder, replaced atomically."""

    def __init__(self, file: StoredFile) -> None:
        self.file = file
        self.set_aside = False  # an unreadable journal was found and moved out of the way

    def exists(self) -> bool:
        return self.file.exists()

    def read(self) -> list[Operation]:
        """What waits. An unreadable journal is set aside, renamed, and reads as empty."""
        if not self.file.exists():
            return []
        try:
            entries = json.loads(self.file.read_text())
            if not isinstance(entries, list):
                raise TypeError(f"a list of writes was expected, found {type(entries).__name__}")
            return [Operation.from_json(entry) for entry in entries]
        except (ValueError, TypeError, KeyError, AttributeError) as error:
            aside = self.file.set_aside()
            self.set_aside = True
            print(
                f"MLflow journal {self.file} is unreadable ({first_line(error)}); set aside as {aside}. "
                "What it held is written again from Tune's own results at the end of the sweep",
                file=sys.stderr,
            )
            return []

    def write(self, operations: list[Operation]) -> None:
        self.file.write_text_atomically(json.dumps([operation.to_json() for operation in operations]))

    def remove(self) -> None:
        self.file.unlink()


class WriteQueue:
    """Applies operations in order; while MLflow fails, keeps them in the journal and retries."""

    RETRY_AFTER_S = 15.0

    def __init__(self, writer: MlflowWriter, journal: Journal) -> None:
        self.writer = writer
        self.journal = journal
        self.pending: list[Operation] = []
        self._journaled = False  # whether the journal file holds writes (so MLflow was failing)
        self._retry_at = 0.0  # no MLflow write before this time (after a failure)

    def load(self) -> None:
        """At the start and on every resume: first what an earlier run could not write."""
        self.pending = self.journal.read() + self.pending
        self._journaled = self.journal.exists()
        self.flush(force=True)

    def submit(self, operation: Operation) -> None:
        self.pending.append(operation)
        self.flush()
        if self.pending:  # the durability rule: on disk before returning
            self._write_journal()

    def flush(self, force: bool = False) -> None:
        """Applies what waits, in order, unless a failure was too recent (and not forced)."""
        if not self.pending or (time.monotonic() < self._retry_at and not force):
            return
        applied = 0
        try:
            for operation in self.pending:
                self.writer.apply(operation)
                applied += 1
        except TRACKING_ERRORS as error:
            if not self._journaled:
                print(f"MLflow at {self.writer.tracking_uri} failed ({first_line(error)[:200]}); training "
                      f"goes on, writes wait in {self.journal.file}", file=sys.stderr)  # fmt: skip
            self._retry_at = time.monotonic() + self.RETRY_AFTER_S
        self.pending = self.pending[applied:]
        if self.pending:
            if applied:  # keep the journal to what still waits
                self._write_journal()
        elif self._journaled:
            self.journal.remove()
            self._journaled = False
            print(
                f"MLflow at {self.writer.tracking_uri} is back; the waiting writes are written",
                file=sys.stderr,
            )

    def _write_journal(self) -> None:
        self.journal.write(self.pending)
        self._journaled = True
