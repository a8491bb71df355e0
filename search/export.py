"""`python -m search.export`: a sweep's best trial as best.json, and optionally every trial as Parquet."""

from __future__ import annotations

import sys

import pyarrow.parquet as pq
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from search.cli import EXIT_OK, OneLineParser, output_file, run_command
from search.tracking.best import best_trial, write_best
from search.tracking.store import (
    check_store_exists,
    child_runs,
    default_tracking_uri,
    find_sweep_run,
    trial_table,
)
from trainables.errors import InputError

PROG = "search.export"


def find_sweep(tracking_uri: str, experiment: str, sweep: str | None) -> tuple[MlflowClient, Run, list[Run]]:
    """The sweep's parent run (default: the experiment's latest sweep) and its trials' runs."""
    client = MlflowClient(check_store_exists(tracking_uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        known = ", ".join(e.name for e in client.search_experiments()) or "none"
        raise InputError(f"no experiment {experiment!r} in {tracking_uri} (known: {known})")
    parent = find_sweep_run(client, found.experiment_id, sweep)
    if parent is None:
        raise InputError(f"no sweep {sweep or ''} in experiment {experiment!r}".replace("  ", " "))
    return client, parent, child_runs(client, parent)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__)
    parser.add_argument("--experiment", required=True, help="MLflow experiment of the sweep")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's, sqlite:///mlflow.db)")
    parser.add_argument("--sweep", help="sweep name (default: the experiment's latest sweep)")
    parser.add_argument("--out", type=output_file, required=True, help="where to write best.json")
    parser.add_argument("--trials", type=output_file, help="also write every trial as a Parquet table here")
    args = parser.parse_args(argv)

    client, parent, children = find_sweep(
        args.tracking_uri or default_tracking_uri(), args.experiment, args.sweep
    )
    if args.trials is not None:  # every trial, whether or not one of them is a best to export
        pq.write_table(trial_table(children), args.trials)
        print(f"{len(children)} trials -> {args.trials}")
    best = best_trial(client, parent, children)
    write_best(best, args.out)
    print(f"Best of sweep {best.sweep}: {best.val_acc:.4f} validation accuracy, run {best.run_id}")
    print(f"  written to {args.out}")
    if parent.info.status == "RUNNING":
        print("Provisional: the sweep is still running, and a better trial may come.")
    return EXIT_OK


if __name__ == "__main__":
    run_command(PROG, lambda: main(sys.argv[1:]))
