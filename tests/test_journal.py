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
from search.tracking.store import child_runs, start_sweep_run
from search.tracking.writer import EndTrial, FinishSweep, LogReport, MlflowWriter, StartTrial
from spaces import get_space
from trainables.names import METRIC, ORPHAN_TAG, RESUMED_AT_TAG, TRIAL_ID_TAG

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


def test_a_trial_that_a_kill_lost_before_tune_saved_it_keeps_one_run_when_tune_makes_it_again(store):
    """A kill -9 after a trial's run reached MLflow but before Tune's snapshot held the trial: the
    resume makes the trial again, with its number and config (so its run name) and a new trial ID.
    Its run is that one, re-tagged, not a second run of the same name (found by the chaos test)."""
    client = MlflowClient(store)
    sweep = start_sweep_run(client, "journal", "lost", SGD, {}, ())
    before_the_kill = MlflowWriter(store, sweep, SGD)
    for operation in (StartTrial("t1", "004 lr=0.01", {"lr": 0.01}), epoch(1)):
        before_the_kill.apply(operation)

    resumed = MlflowWriter(store, sweep, SGD)
    again = [LogReport("t2", step, {METRIC: 0.1 * step}, int(time.time() * 1000)) for step in (1, 2)]
    for operation in (StartTrial("t2", "004 lr=0.01", {"lr": 0.01}), *again):
        resumed.apply(operation)  # trained from the start again: the report the run has is skipped
    (run,) = client.search_runs([sweep.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep.run_id}'")
    assert run.data.tags[TRIAL_ID_TAG] == "t2" and run.info.status == "RUNNING"
    assert [point.step for point in client.get_metric_history(run.info.run_id, METRIC)] == [1, 2]
    assert run.data.tags[RESUMED_AT_TAG] == "0"  # it went on from what the run had


def test_a_lost_trial_that_no_resume_made_again_is_closed_as_an_orphan_when_the_sweep_ends(store):
    """A sweep can end (its budget spent) before a resume makes a lost trial again: its run is then
    FAILED, says why, and is no trial of the sweep for any reader."""
    client = MlflowClient(store)
    sweep = start_sweep_run(client, "journal", "never-again", SGD, {}, ())
    writer = MlflowWriter(store, sweep, SGD)
    for operation in (StartTrial("t1", "001 lr=0.01", {"lr": 0.01}), epoch(1), EndTrial("t1", "FINISHED")):
        writer.apply(operation)
    writer.apply(StartTrial("lost", "002 lr=0.1", {"lr": 0.1}))
    writer.apply(FinishSweep(interrupted=False, trial_ids=["t1"]))

    parent = client.get_run(sweep.run_id)
    assert [run.data.tags[TRIAL_ID_TAG] for run in child_runs(client, parent)] == ["t1"]
    (lost,) = client.search_runs([sweep.experiment_id], "tags.trial_id = 'lost'")
    assert lost.info.status == "FAILED" and "no resume made the trial again" in lost.data.tags[ORPHAN_TAG]
    assert parent.info.status == "FINISHED"
