"""`python -m search.export`: a sweep's best trial as best.json, and optionally every trial as Parquet."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow.parquet as pq
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from search.cli import EXIT_OK, OneLineParser, run_command
from search.tracking.best import BestTrial, best_trial, write_best
from search.tracking.store import (
    check_store_exists,
    child_runs,
    default_tracking_uri,
    find_sweep_run,
    trial_table,
)
from trainables.errors import InputError

PROG = "search.export"


def export_best(tracking_uri: str, experiment: str, sweep: str | None) -> tuple[BestTrial, list[Run]]:
    """The best trial of the sweep (default: the experiment's latest), and all its trials' runs."""
    client = MlflowClient(check_store_exists(tracking_uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise InputError(f"no experiment {experiment!r} in {tracking_uri} (known: {known})")
    parent = find_sweep_run(client, found.experiment_id, sweep)
    if parent is None:
        raise InputError(f"no sweep {sweep or ''} in experiment {experiment!r}".replace("  ", " "))
    children = child_runs(client, parent)
    return best_trial(client, parent, children), children


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__)
    parser.add_argument("--experiment", required=True, help="MLflow experiment of the sweep")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's, sqlite:///mlflow.db)")
    parser.add_argument("--sweep", help="sweep name (default: the experiment's latest sweep)")
    parser.add_argument("--out", type=Path, required=True, help="where to write best.json")
    parser.add_argument("--trials", type=Path, help="also write every trial as a Parquet table here")
    args = parser.parse_args(argv)

    best, children = export_best(args.tracking_uri or default_tracking_uri(), args.experiment, args.sweep)
    write_best(best, args.out)
    print(
        f"Best of sweep {best.sweep}: {best.val_acc:.4f} validation accuracy "
        f"(run {best.run_id}) -> {args.out}"
    )
    if args.trials is not None:
        pq.write_table(trial_table(children), args.trials)
        print(f"{len(children)} trials -> {args.trials}")
    return EXIT_OK


if __name__ == "__main__":
    run_command(PROG, lambda: main(sys.argv[1:]))
