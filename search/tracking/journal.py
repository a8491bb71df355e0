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
from search.tracking.store import TRACKING_ERRORS, failure_cause
from search.tracking.writer import MlflowWriter, Operation, UploadFailed
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
    """Applies operations in order; while MLflow fails, keeps them in the journal and retries.

    Two things can fail apart: the tracking store (then every write waits) and the artifact
    store (then only the uploads wait, and what needs them: metrics, params, tags and statuses
    go on). The writes that wait keep their order.
    """

    RETRY_AFTER_S = 15.0

    def __init__(self, writer: MlflowWriter, journal: Journal) -> None:
        self.writer = writer
        self.journal = journal
        self.pending: list[Operation] = []
        self._journaled = False  # whether the journal file holds writes (so MLflow was failing)
        self._retry_at = 0.0  # no MLflow write before this time (after a failure)
        self._uploads_retry_at = 0.0  # no upload before this time (after an upload failed)
        self.tracking_failure: str | None = None  # why the tracking store failed, while it does
        self.upload_failure: str | None = None  # why the artifact store failed, while it does

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

    @property
    def only_uploads_wait(self) -> bool:
        """Writes wait, and only for the artifact store: the tracking store takes writes."""
        return bool(self.pending) and self.tracking_failure is None and self.upload_failure is not None

    def waiting(self) -> str:
        """What waits, and why, in one line."""
        uploads = sum(operation.needs_uploads for operation in self.pending)
        why = self.tracking_failure or self.upload_failure or "MLflow did not take them in time"
        return f"{why}; {len(self.pending)} writes ({uploads} of them uploads) wait in {self.journal.file}"

    def flush(self, force: bool = False) -> None:
        """Applies what waits, in order, skipping what a failure too recent (and not forced) holds
        back: everything after a tracking failure, the uploads after an upload failure."""
        now = time.monotonic()
        tracking_open = force or now >= self._retry_at
        uploads_open = force or now >= self._uploads_retry_at
        waiting: list[Operation] = []
        for operation in self.pending:
            if not tracking_open or (operation.needs_uploads and not uploads_open):
                waiting.append(operation)
                continue
            try:
                self.writer.apply(operation)
            except UploadFailed as error:
                uploads_open, self._uploads_retry_at = False, now + self.RETRY_AFTER_S
                if self.upload_failure is None:  # once an outage
                    print(f"MLflow's artifact store failed to take an upload ({error}); metrics and run "
                          f"statuses go on to {self.writer.tracking_uri}, uploads wait in "
                          f"{self.journal.file}", file=sys.stderr)  # fmt: skip
                self.upload_failure = f"its artifact store failed: {error}"
                waiting.append(operation)
                continue
            except TRACKING_ERRORS as error:
                tracking_open, self._retry_at = False, now + self.RETRY_AFTER_S
                if self.tracking_failure is None:  # once an outage
                    print(f"MLflow at {self.writer.tracking_uri} failed ({failure_cause(error)}); training "
                          f"goes on, writes wait in {self.journal.file}", file=sys.stderr)  # fmt: skip
                self.tracking_failure = f"{self.writer.tracking_uri} failed: {failure_cause(error)}"
                waiting.append(operation)
                continue
            # Applied: what it waited for works.
            self.tracking_failure = None
            if operation.needs_uploads:
                self.upload_failure = None
        applied = len(self.pending) - len(waiting)
        self.pending = waiting
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
