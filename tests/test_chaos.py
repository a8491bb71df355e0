"""The chaos test: one mechanism, checked under faults at random moments rather than case by case.

A small sweep tracked on a real `mlflow server` runs round after round. In each round
`search.run` starts (a plain run, or `--resume` once Tune has the sweep's state), and one
fault, drawn by a seeded generator, strikes at a random moment: kill -9 of the sweep's
process group, SIGTERM (to the driver or its group), one SIGINT, kill -9 of the MLflow
server and its restart, a journal truncated while MLflow is down, or the output pipe closed.
After every round, and at each sweep's end, the invariants below must hold. A finished sweep
is followed by another, in an experiment of its own, until the rounds are done; the last one
is then run to its end.

CI runs the short form. The long form is a documented command (README, *What survives what*):
CHAOS_ROUNDS=50 CHAOS_SEED=1 pytest tests/test_chaos.py
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, MlflowServer, small_sweep, sweep_args, write_image_folder
from mlflow.tracking import MlflowClient

from search.sweep.settings import SweepSettings
from search.tracking.best import read_best
from trainables.checkpoint import load_checkpoint
from trainables.config import DataSettings
from trainables.data import load_splits
from trainables.names import BEST_METRIC, CHECKPOINT_ARTIFACT, IMAGES_SEEN, METRIC, ORPHAN_TAG

pytestmark = pytest.mark.slow

ROUNDS = int(os.environ.get("CHAOS_ROUNDS", "6"))
SEED = int(os.environ.get("CHAOS_SEED", "0"))
FAULTS = ("kill -9", "SIGTERM", "SIGINT", "mlflow server kill -9", "truncated journal", "closed pipe")
# What each fault may end a run with, besides 0 where the sweep finished first. A server killed
# before the sweep began is refused as at any start (exit 2, nothing written); one still down
# at the end leaves its writes to a resume (exit 3).
EXIT_CODES = {
    "kill -9": {-signal.SIGKILL},
    "SIGTERM": {128 + signal.SIGTERM},
    "SIGINT": {130},
    "mlflow server kill -9": {2, 3},
    "truncated journal": {-signal.SIGKILL, 2, 3},
    "closed pipe": set(),
}


@dataclass
class Round:
    fault: str
    delay_s: float  # after the start of search.run
    killed: bool  # by kill -9: nothing could close its runs, so RUNNING is allowed after
    returncode: int
    stderr: str


def chaos_sweep(tmp_path: Path, server: MlflowServer, number: int) -> SweepSettings:
    """The same sweep each time (so each can be held against one uninterrupted run), in an
    experiment of its own (so no warm start mixes them): ASHA over 6 trials of 2 epochs."""
    images = tmp_path / "images"
    if not images.exists():
        write_image_folder(images, per_class=150)
    data = DataSettings(source=str(images), root=str(tmp_path / "cache"), val_size=30)
    workdir = tmp_path / f"sweep-{number}"
    workdir.mkdir(exist_ok=True)
    return small_sweep(
        images,
        workdir,
        data=data,
        num_samples=6,
        epochs=2,
        tracking_uri=server.uri,
        experiment=f"chaos-{number}",
        name="chaos",
    )


def has_tune_state(settings: SweepSettings) -> bool:
    return any(Path(settings.sweep_location).glob("experiment_state-*.json"))


def run_search(settings: SweepSettings, stderr_file: Path) -> subprocess.Popen:
    """`search.run` as a user starts it: a resume once Tune holds the sweep's state, else a plain
    run (which closes an orphan parent that an early kill left). Its own process group; stdout a
    pipe that the test reads, or closes; stderr a file."""
    args = [*sweep_args(settings), "--max-concurrent", "2"]
    if has_tune_state(settings):
        args.append("--resume")
    with open(stderr_file, "w") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "search.run", *args],
            cwd=Path(settings.storage_path).parent,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            stdout=subprocess.PIPE,
            stderr=stderr,
            start_new_session=True,
        )


def drain(process: subprocess.Popen, until: float) -> None:
    """Reads what the sweep prints until `until` (monotonic) or its end, as a terminal would."""
    while process.poll() is None and time.monotonic() < until:
        if process.stdout is None or process.stdout.closed:
            time.sleep(0.2)
            continue
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready and not os.read(process.stdout.fileno(), 65536):
            process.stdout.close()  # the sweep closed its end


def strike(fault: str, process: subprocess.Popen, settings: SweepSettings, server: MlflowServer, rng) -> bool:
    """Strikes, and says whether it was a kill -9 (a truncated journal needs one)."""
    if fault == "kill -9":
        os.killpg(process.pid, signal.SIGKILL)
        return True
    elif fault == "SIGTERM":  # a service manager signals the driver, a shell's kill the group
        (os.killpg if rng.random() < 0.5 else os.kill)(process.pid, signal.SIGTERM)
    elif fault == "SIGINT":  # Ctrl-C: the terminal signals the whole foreground group
        os.killpg(process.pid, signal.SIGINT)
    elif fault == "mlflow server kill -9":
        server.kill()
        drain(process, time.monotonic() + rng.uniform(1, 8))
        server.start()
    elif fault == "truncated journal":
        server.kill()
        drain_until_journal(process, settings)
        if settings.journal.exists() and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            journal = Path(str(settings.journal))
            text = journal.read_bytes()
            journal.write_bytes(text[: rng.randrange(len(text))])  # as a crash mid-write would leave it
            server.start()
            return True
        server.start()
    elif fault == "closed pipe" and process.stdout is not None:  # the reader goes away, as `| head` does
        process.stdout.close()
    return False


def drain_until_journal(process: subprocess.Popen, settings: SweepSettings, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not settings.journal.exists() and process.poll() is None and time.monotonic() < deadline:
        drain(process, time.monotonic() + 0.5)


def fault_order(rng: random.Random) -> Iterator[str]:
    """Each fault once in a shuffled order, then again: a short run still meets every kind."""
    while True:
        yield from rng.sample(FAULTS, len(FAULTS))


def one_round(
    fault: str, settings: SweepSettings, server: MlflowServer, rng: random.Random, log: Path, within_s: float
) -> Round:
    """One run of search.run, struck by the fault at a moment drawn from its first `within_s`."""
    delay_s, killed = rng.uniform(1, within_s), False
    process = run_search(settings, log)
    try:
        drain(process, time.monotonic() + delay_s)
        if process.poll() is None:
            killed = strike(fault, process, settings, server, rng)
        drain(process, time.monotonic() + 600)
        assert process.poll() is not None, f"search.run did not end after {fault}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        if server.process is None:  # whatever happened, the next round has its server
            server.start()
    return Round(fault, delay_s, killed, process.returncode, log.read_text())


def sweep_runs(settings: SweepSettings) -> tuple[list, list]:
    """The sweep's parent runs (orphans too) and the children of the one that is not an orphan."""
    client = MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.experiment_name)
    if experiment is None:
        return [], []
    ids = [experiment.experiment_id]
    parents = client.search_runs(ids, f"tags.role = 'sweep' and tags.sweep = '{settings.sweep_name}'")
    live = [parent for parent in parents if ORPHAN_TAG not in parent.data.tags]
    if not live:
        return parents, []
    children = client.search_runs(ids, f"tags.`mlflow.parentRunId` = '{live[0].info.run_id}'")
    return parents, children


def assert_round_invariants(settings: SweepSettings, done: Round, left_open: bool) -> None:
    """What holds whenever a run of search.run has ended, whatever struck it. `left_open`: runs a
    kill -9 left RUNNING may still be, since no run got past its start to close them (one refused
    at the start, with exit 2, writes nothing)."""
    assert done.returncode in {0} | EXIT_CODES[done.fault], (done, done.stderr[-3000:])
    if done.returncode == 2:  # refused at the start, as a server down then always is
        assert "search.run: error: MLflow" in done.stderr, done.stderr[-3000:]
    if not done.killed:
        assert "Traceback" not in done.stderr, done.stderr[-3000:]
    parents, children = sweep_runs(settings)
    live = [parent for parent in parents if ORPHAN_TAG not in parent.data.tags]
    assert len(live) <= 1, [parent.info.run_id for parent in live]  # one parent run, orphans closed
    assert all(parent.info.status == "FAILED" for parent in parents if parent not in live)
    for counted in (
        Counter(child.data.tags["trial_id"] for child in children),
        Counter(child.info.run_name for child in children),
    ):
        assert all(count == 1 for count in counted.values()), counted  # one run per trial, uniquely named
    if not left_open:  # a run that ended itself closed its runs
        statuses = [run.info.status for run in [*live, *children]]
        assert "RUNNING" not in statuses, (done, statuses)


def tune_results(settings: SweepSettings) -> dict[str, list[dict]]:
    """Tune's own record of each trial, by trial id: its results, from its folder's result.json."""
    results: dict[str, list[dict]] = {}
    for path in Path(settings.sweep_location).glob("*/result.json"):
        for line in path.read_text().splitlines():
            try:
                result = json.loads(line)
            except json.JSONDecodeError:  # half a line that a kill left: the resumed trial wrote it again
                continue
            results.setdefault(result["trial_id"], []).append(result)
    return results


def assert_complete_sweep(settings: SweepSettings, tmp_path: Path) -> dict[str, list[int]]:
    """The invariants of a finished sweep; each trial's reported steps, by run name."""
    assert not settings.journal.exists()  # every write landed
    parents, children = sweep_runs(settings)
    (parent,) = [parent for parent in parents if ORPHAN_TAG not in parent.data.tags]
    assert parent.info.status == "FINISHED"
    results = tune_results(settings)
    assert len(children) == settings.num_samples == len(results)
    client = MlflowClient(settings.tracking_uri)
    steps = {}
    for child in children:
        assert child.info.status == "FINISHED"
        trial = results[child.data.tags["trial_id"]]
        tune_steps = sorted({int(result[IMAGES_SEEN]) for result in trial})
        logged = sorted(point.step for point in client.get_metric_history(child.info.run_id, METRIC))
        assert logged == tune_steps, child.info.run_name  # every report, once
        # Checkpoints come at epoch ends: a trial that ASHA stopped within its first epoch has none.
        checkpointed = [result[METRIC] for result in trial if result.get("checkpoint_dir_name")]
        if checkpointed:  # its best is in MLflow, whole, and loads
            assert child.data.metrics[BEST_METRIC] == pytest.approx(max(checkpointed))
            load_checkpoint(
                Path(client.download_artifacts(child.info.run_id, CHECKPOINT_ARTIFACT, str(tmp_path)))
            )
        else:
            assert BEST_METRIC not in child.data.metrics
        steps[child.info.run_name] = logged
    out = tmp_path / "best.json"
    exported = subprocess.run(
        [sys.executable, "-m", "search.export", "--tracking-uri", settings.tracking_uri]
        + ["--experiment", settings.experiment_name, "--sweep", settings.sweep_name, "--out", str(out)],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert exported.returncode == 0, exported.stderr
    checkpointed = [
        result for trial in results.values() for result in trial if result.get("checkpoint_dir_name")
    ]
    best, best_of_tune = read_best(out), max(result[METRIC] for result in checkpointed)
    assert best.val_acc == pytest.approx(best_of_tune)  # the best of Tune's own checkpointed results
    named = client.get_run(best.run_id).data.tags["trial_id"]
    assert best_of_tune in [result[METRIC] for result in results[named]]
    return steps


def reports_done(settings: SweepSettings) -> int:
    """The sweep's reports that Tune holds, each once (a resumed trial writes some again)."""
    return sum(len({result[IMAGES_SEEN] for result in trial}) for trial in tune_results(settings).values())


@dataclass(frozen=True)
class Timing:
    """The uninterrupted sweep's: seconds to its first report and to its end, and its reports."""

    first_report_s: float
    sweep_s: float
    reports: int

    def window_s(self, settings: SweepSettings) -> float:
        """A run's moments, from its start to about its end, which a fault is drawn from: a resumed
        run is shorter, by what the sweep has done, and a fault after its end would strike nothing."""
        left = max(0.0, 1 - reports_done(settings) / self.reports)
        return self.first_report_s + (self.sweep_s - self.first_report_s) * left


def test_faults_at_random_moments_never_lose_or_misrecord_anything(server, tmp_path):
    # The sweep once, uninterrupted: what each trial reports, which ASHA decides, must not change.
    # Its images decoded first, as every later run finds them: its timing is then theirs.
    reference = chaos_sweep(tmp_path, server, 0)
    load_splits(reference.data)
    started, wall_start = time.monotonic(), time.time()
    process = run_search(reference, tmp_path / "reference.stderr")
    drain(process, started + 600)
    assert process.wait() == 0, (tmp_path / "reference.stderr").read_text()[-3000:]
    sweep_s = time.monotonic() - started
    expected = assert_complete_sweep(reference, tmp_path / "reference")
    first_report = min(result["timestamp"] for trial in tune_results(reference).values() for result in trial)
    timing = Timing(first_report - wall_start, sweep_s, reports_done(reference))

    rng = random.Random(SEED)
    number, settings, rounds, left_open = 1, chaos_sweep(tmp_path, server, 1), [], False
    for index, fault in zip(range(ROUNDS), fault_order(rng), strict=False):
        window_s = timing.window_s(settings)
        done = one_round(fault, settings, server, rng, tmp_path / f"round-{index}.stderr", window_s)
        rounds.append(done)
        print(f"round {index}: {fault} at {done.delay_s:.1f} of {window_s:.0f} s, exit {done.returncode}")
        left_open = done.killed or (left_open and done.returncode == 2)
        assert_round_invariants(settings, done, left_open)
        if done.returncode == 0:  # this sweep is done: check it, and start the next
            assert assert_complete_sweep(settings, tmp_path / f"check-{number}") == expected
            number += 1
            settings = chaos_sweep(tmp_path, server, number)
    if sweep_runs(settings)[0] or has_tune_state(settings):  # the last sweep, to its end without faults
        process = run_search(settings, tmp_path / "last.stderr")
        drain(process, time.monotonic() + 600)
        assert process.wait() == 0, (tmp_path / "last.stderr").read_text()[-3000:]
        assert assert_complete_sweep(settings, tmp_path / f"check-{number}") == expected
    print(f"{len(rounds)} rounds, {number} sweeps: {dict(Counter(done.fault for done in rounds))}")
