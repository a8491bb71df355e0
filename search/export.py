"""`python -m search.export`: a sweep's best trial as best.json, every trial as Parquet, and with
--register the best trial's model in MLflow's registry.

A sweep whose trials train to the final budget (`search.run --top-rung best`, say) ends with a
final model already: its best trial. --register logs that trial's checkpoint as a model in
MLflow's pytorch flavor, with a signature, an input example and, when the data has a test split,
its test accuracy with the 95% interval, and registers it, with no retrain.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

from search.cli import EXIT_OK, OneLineParser, output_file, run_command
from search.tracking.best import BestTrial, best_trial, write_best
from search.tracking.models import TestResult, register_trial_model
from search.tracking.store import (
    SweepRuns,
    default_tracking_uri,
    download_checkpoint,
    find_sweep,
    trial_table,
)
from trainables.checkpoint import load_checkpoint, scored_module
from trainables.config import DataSettings
from trainables.data import has_test_split, load_images
from trainables.loop import Normalizer, predict

PROG = "search.export"


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    uri: str
    version: str
    tested: TestResult | None  # on the data's test split, where it has one


def register_best(sweep: SweepRuns, best: BestTrial, name: str, data: DataSettings) -> RegisteredModel:
    """The best trial's checkpoint, the weights that scored it, registered as model `name`, in fp32 as
    a user loads it, and tested so on the data's test split where there is one."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = load_checkpoint(download_checkpoint(sweep.client, best.run_id, Path(directory)))
    module, spec = scored_module(checkpoint), checkpoint.spec
    tested = None
    if has_test_split(data):
        test = load_images(data, "test")
        tested = TestResult(predict(module, spec, test.images), test.labels, test.classes)
        example_images = test.images[:2]
    else:
        example_images = load_images(data, "train").images[:2]
    example = Normalizer(spec.mean, spec.std, example_images.device)(example_images)
    trial = {"run_id": best.run_id, "sweep": best.sweep}
    uri, version = register_trial_model(
        best.tracking_uri, best.experiment, trial, module, example, name, tested
    )
    return RegisteredModel(uri, version, tested)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="MLflow experiment of the sweep")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: MLflow's, sqlite:///mlflow.db)")
    parser.add_argument("--sweep", help="sweep name (default: the experiment's latest sweep)")
    parser.add_argument("--out", type=output_file, required=True, help="where to write best.json")
    parser.add_argument("--trials", type=output_file, help="also write every trial as a Parquet table here")
    parser.add_argument("--register", metavar="NAME", help="register the best trial's model under this name")
    parser.add_argument("--data", help="where the test split is, for --register (default: the sweep's)")
    parser.add_argument("--data-root", help="download and cache folder (default: the sweep's)")
    args = parser.parse_args(argv)

    sweep = find_sweep(args.tracking_uri or default_tracking_uri(), args.experiment, args.sweep)
    if args.trials is not None:  # every trial, whether or not one of them is a best to export
        pq.write_table(trial_table(sweep.children), args.trials)
        print(f"{len(sweep.children)} trials -> {args.trials}")
    best = best_trial(sweep.client, sweep.parent, sweep.children)
    write_best(best, args.out)
    print(f"Best of sweep {best.sweep}: {best.val_acc:.4f} validation accuracy, run {best.run_id}")
    print(f"  written to {args.out}")
    if sweep.parent.info.status == "RUNNING":
        print("Provisional: the sweep is still running, and a better trial may come.")
    if args.register is not None:
        data = dataclasses.replace(
            best.data, source=args.data or best.data.source, root=args.data_root or best.data.root
        )
        registered = register_best(sweep, best, args.register, data)
        print(
            f"Registered {args.register!r} version {registered.version}: {registered.uri}, run {best.run_id}"
        )
        if registered.tested is None:
            print(f"  untested: {data.source} has no test split")
        else:
            print(f"  {registered.tested.summary()}")
    return EXIT_OK


if __name__ == "__main__":
    run_command(PROG, lambda: main(sys.argv[1:]))
