"""`python -m search.run --space NAME`: sweep a search space and record it in MLflow."""

from __future__ import annotations

import argparse
import contextlib
import math
import shlex
import signal
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TextIO
from urllib.parse import urlparse

from search.cli import (
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_SIGNALLED,
    EXIT_SOME_TRIALS_FAILED,
    EXIT_STORAGE_FAILED,
    EXIT_TRACKING_FAILED,
    OneLineParser,
    add_data_options,
    add_recipe_options,
    at_least_two,
    compute_budget,
    data_settings,
    default,
    duration,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    recipe_from,
    run_command,
)
from search.sweep.settings import (
    COMPUTE_BUDGET_TFLOP_PER_EPOCH,
    SAMPLERS,
    SCHEDULERS,
    TOP_RUNGS,
    SweepSettings,
    check_ray_address,
)
from search.sweep.signals import StopSignals, SweepStopped
from search.tracking.uri import check_reachable
from spaces import SearchSpace, get_space, parse_fix, parse_range, space_names, space_record
from trainables.config import PRECISIONS
from trainables.errors import first_line
from trainables.recipe import RECIPES
from trainables.stats import wilson_interval

if TYPE_CHECKING:  # only for annotations: importing it loads torch, Ray and MLflow
    from search.sweep.engine import SweepOutcome

PROG = "search.run"


def parse_arguments(argv: list[str] | None = None) -> tuple[argparse.Namespace, SweepSettings | None]:
    """The arguments, and the sweep they ask for (None for --list-spaces, which needs no space)."""
    parser = OneLineParser(prog=PROG, description=__doc__)
    space = parser.add_argument_group("search space")
    space.add_argument(
        "--space",
        help=f"{', '.join(space_names())}, or your own: FILE.py:FUNCTION or MODULE:FUNCTION",
    )
    space.add_argument(
        "--range",
        action="append",
        default=[],
        metavar="NAME=LOW:HIGH[:log]",
        help="sample a searched parameter from this range instead (repeatable)",
    )
    space.add_argument(
        "--fix",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="pin a searched parameter, or a constant of the space, to a value (repeatable)",
    )
    space.add_argument(
        "--show", action="store_true", help="print the space's parameters and first point, and exit"
    )
    space.add_argument("--list-spaces", action="store_true", help="print the assignment's spaces, and exit")
    add_data_options(parser)
    sweep = parser.add_argument_group("sweep")
    option = _options_of(sweep)
    option("--epochs", type=positive_int, help="most epochs a trial gets")
    option("--num-samples", type=positive_int, help="trials")
    option("--scheduler", choices=SCHEDULERS, help="asha stops weak trials early; fifo runs each to the end")
    option(
        "--rungs",
        type=positive_int,
        help="ASHA's, the last at all the training, each --reduction-factor times the one below "
        "(default: enough to put the lowest at a ninth of the first epoch; 3 for one epoch)",
    )
    option("--reduction-factor", type=at_least_two, help="of the trials at a rung, 1 in this many goes on")
    option(
        "--top-rung",
        choices=TOP_RUNGS,
        help="asha promotes to the last rung as to any; best trains only the search's best to it, with "
        "every CPU, once the search ends: a sweep at a final model's budget",
    )
    option("--sampler", choices=SAMPLERS, help="gp (Gaussian process), tpe (multivariate) or random")
    option("--time-budget", dest="time_budget_s", type=duration, help="e.g. 10m: then no new trial starts")
    option(
        "--compute-budget",
        dest="compute_budget_tflop",
        type=compute_budget,
        help=f"TFLOP of training, then no new trial starts; none: no budget (default: "
        f"{COMPUTE_BUDGET_TFLOP_PER_EPOCH:g} per epoch of --epochs)",
    )
    sweep.add_argument(
        "--warm-start",
        action=argparse.BooleanOptionalAction,
        default=default(SweepSettings, "warm_start"),
        help="start from the finished trials of earlier sweeps of the space on the same data and fidelity",
    )
    option("--seed", type=non_negative_int, help="sampler, split, initial weights and batch order")
    option("--precision", choices=PRECISIONS, help="model arithmetic; auto: bf16 where the CPU or GPU has it")
    option("--max-failures", type=non_negative_int, help="retries of a crashed trial")
    add_recipe_options(
        parser,
        "how every trial trains over --epochs, and the best's retrain: assignment (no augmentation, one "
        "cycle to the config's lr) or long (crops, flips, label smoothing, wsd to a searched peak) "
        f"(default: {default(SweepSettings, 'recipe').name})",
    )
    resources = parser.add_argument_group("resources")
    option = _options_of(resources)
    option(
        "--gpus-per-trial", type=non_negative_float, help="fractions share a GPU (default: 0.25 with a GPU)"
    )
    option("--cpus-per-trial", type=positive_float, help="also the torch threads of a trial")
    option("--max-concurrent", type=positive_int, help="trials at once (default: as resources allow)")
    option("--address", help="join this Ray cluster (default: start a local one)")
    where = parser.add_argument_group("where results go")
    option = _options_of(where)
    option("--tracking-uri", help="MLflow tracking URI (default: MLflow's, sqlite:///mlflow.db)")
    option(
        "--tracking-grace",
        dest="tracking_grace_s",
        type=duration,
        help="at the end, how long (seconds, or e.g. 2m) writes waiting for MLflow are retried "
        "before --resume must make them",
    )
    option("--experiment", help="MLflow experiment (default: cifar10-<space>)")
    option("--storage-path", help="Tune's results and checkpoints: a folder, or a URI pyarrow reads")
    option("--name", help="sweep name (default: <space>-<timestamp>)")
    where.add_argument("--resume", action="store_true", help="continue the sweep named by --name")
    shown = parser.add_mutually_exclusive_group()
    shown.add_argument("--verbose", action="store_true", help="show Tune's own tables instead of one line")
    shown.add_argument("--quiet", action="store_true", help="print only the final summary")
    args = parser.parse_args(argv)
    if args.list_spaces:
        return args, None
    if args.space is None:
        parser.error("the following arguments are required: --space")
    return args, SweepSettings(
        space=args.space,
        ranges=tuple(parse_range(text) for text in args.range),
        fixed=tuple(parse_fix(text) for text in args.fix),
        data=data_settings(args, seed=args.seed),
        epochs=args.epochs,
        num_samples=args.num_samples,
        scheduler=args.scheduler,
        rungs=args.rungs,
        reduction_factor=args.reduction_factor,
        top_rung=args.top_rung,
        sampler=args.sampler,
        recipe=recipe_from(args, RECIPES[args.recipe or default(SweepSettings, "recipe").name]),
        warm_start=args.warm_start,
        time_budget_s=args.time_budget_s,
        compute_budget_tflop=args.compute_budget_tflop,
        seed=args.seed,
        precision=args.precision,
        gpus_per_trial=args.gpus_per_trial,
        cpus_per_trial=args.cpus_per_trial,
        max_concurrent=args.max_concurrent,
        max_failures=args.max_failures,
        tracking_uri=args.tracking_uri,
        tracking_grace_s=args.tracking_grace_s,
        experiment=args.experiment,
        storage_path=args.storage_path,
        name=args.name,
        resume=args.resume,
        address=args.address,
        output="verbose" if args.verbose else "quiet" if args.quiet else "progress",
    )


def _options_of(group: Any) -> Callable[..., Any]:
    """add_argument for an option of SweepSettings, with the field's default: defined once, there."""

    def option(flag: str, **kwargs: Any) -> Any:
        field = kwargs.get("dest", flag[2:].replace("-", "_"))
        return group.add_argument(flag, default=default(SweepSettings, field), **kwargs)

    return option


def summary_lines(outcome: SweepOutcome) -> list[str]:
    counts = (
        ", ".join(f"{count} {status.lower()}" for status, count in sorted(outcome.trial_statuses.items()))
        or "no trial recorded yet"
    )
    diverged = f", {outcome.diverged} of them diverged" if outcome.diverged else ""
    lines = ["", f"Sweep {outcome.sweep}: {counts}{diverged}"]
    budget = f" (budget {outcome.compute_budget:g})" if math.isfinite(outcome.compute_budget) else ""
    lines.append(f"Compute: {outcome.trained_tflop:.1f} TFLOP of training{budget}")
    if outcome.closed_orphan is not None:
        lines.append(
            f"Closed run {outcome.closed_orphan} FAILED: an earlier parent of this name whose sweep "
            "stopped before Tune saved any state (see its orphan tag)"
        )
    if outcome.ended_by is not None:
        lines.append(f"Ended by {outcome.ended_by}: no trial started after it")
    if outcome.warm_start or outcome.warm_start_skipped:
        skipped = outcome.warm_start_skipped
        outside = f" ({skipped} skipped: outside the space's ranges)" if skipped else ""
        lines.append(f"Warm start: from {outcome.warm_start} finished trials of earlier sweeps{outside}")
    if outcome.final_trial is not None:
        lines.append(f"Final trial: {outcome.final_trial}, the search's best trained to the end")
    elif outcome.no_final_reason:
        lines.append(f"No final trial: {outcome.no_final_reason}")
    lines += [f"  failed: {run_name}: {error}" for run_name, error in outcome.failures.items()]
    if outcome.best_accuracy is None:
        lines.append(f"No best config: {outcome.no_best_reason}.")
    else:
        low, high = wilson_interval(outcome.best_accuracy, outcome.val_size)
        lines.append(
            f"Best {outcome.best_accuracy:.4f} validation accuracy (95% interval {low:.4f}-{high:.4f} on "
            f"{outcome.val_size} images), MLflow run {outcome.best_run_id}"
        )
        lines.append("Best config: " + ", ".join(f"{k}={v}" for k, v in sorted(outcome.best_config.items())))
    lines.append(
        f"MLflow: experiment {outcome.experiment!r}, parent run {outcome.parent_run_id}, "
        f"store {outcome.tracking_uri}"
    )
    export = ["python", "-m", "search.export", "--experiment", outcome.experiment]
    export += ["--tracking-uri", outcome.tracking_uri, "--sweep", outcome.sweep, "--out", "best.json"]
    lines.append(f"  browse:  {browse_command(outcome)}")
    if outcome.best_accuracy is not None:  # else export has nothing to write
        lines.append(f"  export:  {shlex.join(export)}")  # quoted: a path with a space pastes whole
    return lines


def print_summary(outcome: SweepOutcome) -> None:
    print("\n".join(summary_lines(outcome)))


def browse_command(outcome: SweepOutcome) -> str:
    """A tracking server is its own UI: its page of the sweep. A store on disk needs `mlflow ui`."""
    if urlparse(outcome.tracking_uri).scheme in {"http", "https"}:
        experiment = f"/#/experiments/{outcome.experiment_id}/runs/{outcome.parent_run_id}"
        return outcome.tracking_uri.rstrip("/") + (experiment if outcome.experiment_id else "")
    return shlex.join(["mlflow", "ui", "--backend-store-uri", outcome.tracking_uri])


class LastWords:
    """What search.run prints as a sweep ends, kept also beside the sweep's folder and on its parent
    run (LAST_WORDS_TXT), where a user whose terminal closed under the sweep finds the summary and
    the resume command."""

    def __init__(self, argv: list[str], settings: SweepSettings) -> None:
        self.argv, self.settings = argv, settings
        self.lines: list[str] = []

    def say(self, lines: list[str], stream: TextIO | None = None) -> None:
        print("\n".join(lines), file=stream or sys.stdout)
        self.lines += lines

    def interrupted(self, sweep: str, signum: int | None = None) -> None:
        """The resume command goes last, on its own line, so it is easy to copy."""
        why = "Interrupted" if signum is None else f"Stopped by {signal.Signals(signum).name}"
        sys.stdout.flush()  # the summary first, even when stdout is a pipe
        self.say(["", f"{why}. Resume with:", f"  {resume_command(self.argv, sweep)}"], sys.stderr)

    def keep(self, outcome: SweepOutcome | None = None) -> None:
        """Beside the sweep's folder, and on its parent run when MLflow answered at the end; neither
        write may fail the command (a full disk is reported already)."""
        text = "\n".join(self.lines).strip() + "\n"
        with contextlib.suppress(OSError):  # pyarrow's errors are OSErrors too
            self.settings.last_words_file.write_text_atomically(text)
        if outcome is not None:
            from search.tracking.store import log_last_words

            log_last_words(outcome.tracking_uri, outcome.parent_run_id, text)


def resume_command(argv: list[str], sweep: str) -> str:
    """The command that continues this sweep: the same arguments, with its name and --resume."""
    args = list(argv)
    if "--name" not in args and not any(arg.startswith("--name=") for arg in args):
        args += ["--name", sweep]
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join([sys.executable.rsplit("/", 1)[-1], "-m", "search.run", *args])


def space_lines(space: SearchSpace) -> list[str]:
    """--show: each parameter with its range, scale and where it came from; the constants; the first
    point, and what --range and --fix changed in it."""
    record = space_record(space)
    lines = [f"{space.name}: {space.summary}", f"  ({record['space']})"]
    lines += [f"  {name:<16} {part['range']:<28} {part['from']}" for name, part in record["searched"].items()]
    lines += [f"  {name:<16} {value!s:<28} --fix" for name, value in record["fixed"].items()]
    constants = ", ".join(
        f"{name}={value}" for name, value in record["constants"].items() if name not in record["fixed"]
    )
    lines.append(f"constants: {constants}")
    first = ", ".join(f"{name}={value}" for name, value in space.first_point.items()) or "none"
    return [*lines, f"first point: {first}", *space.notes]


def main(argv: list[str] | None = None) -> int:
    """search.run; no stop signal or Ctrl-C ever ends it with a traceback or by the default action."""
    argv = sys.argv[1:] if argv is None else argv
    with StopSignals() as stop:
        try:
            return _main(argv, stop)
        except SweepStopped as stopped:  # before the sweep began (later ones are handled in _main)
            print(
                f"{PROG}: stopped by {signal.Signals(stopped.signum).name} before the sweep began",
                file=sys.stderr,
            )
            return EXIT_SIGNALLED + stopped.signum
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted before the sweep began", file=sys.stderr)
            return EXIT_INTERRUPTED


def _main(argv: list[str], stop: StopSignals) -> int:
    args, settings = parse_arguments(argv)
    if settings is None:  # --list-spaces
        print("\n".join(f"{name:<10} {get_space(name).summary}" for name in space_names()))
        return EXIT_OK
    if args.show:
        print("\n".join(space_lines(settings.search_space)))
        return EXIT_OK
    if settings.search_space.notes:  # what --range and --fix changed in the first point
        print("\n".join(settings.search_space.notes))
    if settings.tracking_uri is not None:
        check_reachable(settings.tracking_uri)
    check_ray_address(settings.address)
    settings.check_resumes_the_same_sweep()
    # Only now the heavy part: torch, Ray and MLflow take seconds to load, and bad options,
    # an unreachable server or cluster, have been refused by then.
    from search.sweep.engine import run_sweep, tune_saved
    from search.tracking.store import TrackingFailed

    last_words = LastWords(argv, settings)

    def abandoned(signum: int) -> None:  # Ray went down under a stop signal: no outcome to read
        last_words.interrupted(settings.sweep_name, signum)
        last_words.keep()

    stop.on_abandon.append(abandoned)
    try:
        outcome = run_sweep(settings, stop=stop)
    except KeyboardInterrupt:  # a second Ctrl-C: Tune's last snapshot stands, leave at once
        if not tune_saved(settings):  # nothing a resume could continue: said as before the sweep
            raise
        last_words.interrupted(settings.sweep_name)
        last_words.keep()
        return EXIT_INTERRUPTED
    except SweepStopped as stopped:  # SIGTERM or SIGHUP before Tune ran, or a second one
        if not tune_saved(settings):
            raise
        last_words.interrupted(settings.sweep_name, stopped.signum)
        last_words.keep()
        return EXIT_SIGNALLED + stopped.signum
    except TrackingFailed as error:  # training is done and kept; MLflow is what failed
        kept = f"the results are kept in {settings.sweep_location}"
        last_words.say(
            [
                f"{PROG}: error: MLflow failed at the end, {first_line(error)}; {kept}. "
                "Once MLflow is back, write them with:",
                f"  {resume_command(argv, settings.sweep_name)}",
            ],
            sys.stderr,
        )
        last_words.keep()
        return EXIT_TRACKING_FAILED
    last_words.say(summary_lines(outcome))
    if outcome.storage_error is not None:
        last_words.say(
            [
                f"{PROG}: error: Tune's storage {settings.storage} failed ({outcome.storage_error}); "
                "free space there, then resume with:",
                f"  {resume_command(argv, outcome.sweep)}",
            ],
            sys.stderr,
        )
    elif outcome.interrupted:
        last_words.interrupted(outcome.sweep, outcome.stop_signal)
    last_words.keep(outcome)
    return exit_code(outcome)


def exit_code(outcome: SweepOutcome) -> int:
    """0 when every trial finished (diverged ones too), 1 when some failed, 4 when Tune's storage
    failed, 130 when interrupted by Ctrl-C, 128 + the signal's number when stopped by one."""
    if outcome.storage_error is not None:
        return EXIT_STORAGE_FAILED
    if outcome.interrupted:
        return EXIT_INTERRUPTED if outcome.stop_signal is None else EXIT_SIGNALLED + outcome.stop_signal
    return EXIT_SOME_TRIALS_FAILED if outcome.failures else EXIT_OK


if __name__ == "__main__":
    run_command(PROG, lambda: main(sys.argv[1:]))
