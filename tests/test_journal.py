"""The MLflow write queue: what Tune reported is on disk at once while MLflow is down, and is
written exactly once when it is back. A real SQLite store, a real refused connection, no Ray."""

from __future__ import annotations

import json
import time

import pytest
from conftest import free_port
from mlflow.tracking import MlflowClient

from search.storage import StoredFile
from search.tracking.journal import Journal, WriteQueue
from search.tracking.store import start_sweep_run
from search.tracking.writer import EndTrial, LogReport, MlflowWriter, StartTrial
from spaces import get_space
from trainables.names import METRIC

SGD = get_space("sgd")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    uri = f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"
    MlflowClient(uri).search_experiments()  # creating a store takes seconds: once for the module
    return uri


@pytest.fixture
def down(monkeypatch) -> str:
    """An MLflow server address where nothing listens, refused at once (no retries)."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")
    return f"http://127.0.0.1:{free_port()}"


def epoch(step: int) -> LogReport:
    return LogReport("t1", step, {METRIC: 0.1 * step}, timestamp_ms=int(time.time() * 1000))


def test_writes_made_while_mlflow_is_down_are_on_disk_before_submit_returns(store, down, tmp_path):
    sweep = start_sweep_run(MlflowClient(store), "journal", "down", SGD, {}, ())
    journal = Journal(StoredFile(str(tmp_path / "journal.json")))
    queue = WriteQueue(MlflowWriter(down, sweep, SGD), journal)
    operations = [StartTrial("t1", "001 lr=0.01", {"lr": 0.01}), epoch(1), epoch(2)]
    for submitted, operation in enumerate(operations, start=1):
        queue.submit(operation)
        assert journal.read() == operations[:submitted]  # never only in memory


def test_a_journal_is_written_once_when_mlflow_is_back_even_if_replayed_twice(store, down, tmp_path):
    client = MlflowClient(store)
    sweep = start_sweep_run(client, "journal", "replay", SGD, {}, ())
    journal = Journal(StoredFile(str(tmp_path / "journal.json")))
    down_queue = WriteQueue(MlflowWriter(down, sweep, SGD), journal)
    for operation in (StartTrial("t1", "001", {"lr": 0.01}), epoch(1), epoch(2), EndTrial("t1", "FINISHED")):
        down_queue.submit(operation)
    saved = journal.file.read_text()

    for _ in range(2):  # a crash after the writes but before the journal's removal replays it
        journal.file.write_text_atomically(saved)
        WriteQueue(MlflowWriter(store, sweep, SGD), journal).load()
        assert not journal.exists()
    (run,) = client.search_runs([sweep.experiment_id], "tags.trial_id = 't1' and tags.sweep = 'replay'")
    assert [point.step for point in client.get_metric_history(run.info.run_id, METRIC)] == [1, 2]
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.01"}


@pytest.mark.parametrize("damage", ["half", "empty", "not a list"])
def test_an_unreadable_journal_is_set_aside_not_deleted_and_reads_as_empty(tmp_path, capsys, damage):
    file = StoredFile(str(tmp_path / "journal.json"))
    Journal(file).write([StartTrial("t1", "001", {"lr": 0.01}), epoch(1)])
    text = file.read_text()
    damaged = {"half": text[: len(text) // 2], "empty": "", "not a list": "{}"}[damage]
    file.write_text_atomically(damaged)
    assert Journal(file).read() == []
    (aside,) = tmp_path.glob("journal.json.unreadable-*")
    assert not file.exists() and aside.read_text() == damaged  # kept for a person to look at
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "is unreadable" in message[0] and str(aside) in message[0]


def test_operations_round_trip_through_the_journal_as_json(tmp_path):
    operations = [
        StartTrial("t1", "001 lr=0.01", {"lr": 0.01, "model": "module"}),
        epoch(3),
        EndTrial("t1", "KILLED", True),
    ]
    journal = Journal(StoredFile(str(tmp_path / "journal.json")))
    journal.write(operations)
    assert json.loads(journal.file.read_text())[1]["kind"] == "LogReport"
    assert journal.read() == operations
