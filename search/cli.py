"""What every command shares: one-line errors, number parsing, the exit codes."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO

from search.tracking.uri import is_mlflow_error
from trainables.config import DataSettings
from trainables.errors import InputError, first_line
from trainables.recipe import PARTS, RECIPE_NAMES, SCHEDULES, Recipe

EXIT_OK = 0
EXIT_SOME_TRIALS_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TRACKING_FAILED = 3  # after the training ran: its results are kept, the writes wait for --resume
EXIT_STORAGE_FAILED = 4  # Tune's storage failed (a full disk, say)
EXIT_SIGNALLED = 128  # plus the signal's number: 143 for SIGTERM, 129 for SIGHUP, as shells report them
EXIT_INTERRUPTED = EXIT_SIGNALLED + 2  # 130: Ctrl-C


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not the whole usage text, and --help shows defaults."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(formatter_class=_DefaultsHelp, **kwargs)

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


class _DefaultsHelp(argparse.HelpFormatter):
    """Appends an option's default to its help, where it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        shown = (
            action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        )
        if shown and "default" not in text:
            text += " (default: %(default)s)"
        return text


def default(settings: type, name: str) -> Any:
    """The default of a settings dataclass's field: every command's options read theirs from there."""
    field = {field.name: field for field in dataclasses.fields(settings)}[name]
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()  # type: ignore[misc]


KIND_NAMES = {int: "whole number", float: "number"}


def _number(kind: type, minimum: float, inclusive: bool = True) -> Callable[[str], float]:
    word = ">=" if inclusive else ">"

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a {KIND_NAMES[kind]}") from None
        if not math.isfinite(value) or value < minimum or (not inclusive and value == minimum):
            raise argparse.ArgumentTypeError(f"{text} must be {word} {minimum:g}")
        return value

    return parse


def compute_budget(text: str) -> float:
    """TFLOP, from 60 or 2.5e2; none for no budget (inf)."""
    if text.lower() == "none":
        return math.inf
    return _more_than_zero(text, text, "a number of TFLOP, or none", " TFLOP, or none")


def duration(text: str) -> float:
    """Seconds, from 90, 90s, 10m or 1.5h."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1)
    return _more_than_zero(number, text, "a duration such as 90s, 10m or 1.5h") * unit


def _more_than_zero(number: str, text: str, what: str, unit: str = "") -> float:
    """The number in `text`, finite and more than 0, or an error in the words of what was asked for."""
    try:
        value = float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0{unit}")
    return value


def output_file(text: str) -> Path:
    """A file to write, checked before the work: a retrain should not fail at its last line."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder, not a file")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write in folder {path.parent}")
    return path


positive_int = _number(int, 1)
at_least_two = _number(int, 2)
non_negative_int = _number(int, 0)
positive_float = _number(float, 0.0, inclusive=False)
non_negative_float = _number(float, 0.0)


def add_data_options(parser: argparse.ArgumentParser) -> None:
    """The options that pick the images and their split, as search.run and search.bench share them."""
    group = parser.add_argument_group("data")
    group.add_argument(
        "--data",
        default=default(DataSettings, "source"),
        help="'cifar10', or a folder holding train/<class>/<image>",
    )
    group.add_argument("--data-root", default=default(DataSettings, "root"), help="download and cache folder")
    group.add_argument(
        "--val-size", type=positive_int, default=default(DataSettings, "val_size"), help="validation images"
    )
    group.add_argument("--max-train-images", type=positive_int, help="train on fewer images, for quick runs")


def add_recipe_options(parser: argparse.ArgumentParser, recipe_help: str) -> None:
    """How each trial (search.run) or the final model (search.retrain) trains: a named recipe, and
    each of its parts, as both commands share them."""
    group = parser.add_argument_group("recipe (each part's default: the recipe's)")
    group.add_argument("--recipe", choices=RECIPE_NAMES, help=recipe_help)
    group.add_argument("--schedule", choices=SCHEDULES, help="the learning rate over the run")
    group.add_argument(
        "--peak-lr-factor", type=positive_float, help="the peak, as a multiple of the config's lr"
    )
    group.add_argument(
        "--max-effective-step", type=positive_float, help="the most the peak may be as lr / (1 - momentum)"
    )
    group.add_argument(
        "--warmup-fraction", type=non_negative_float, help="of the run, warming up to the peak"
    )
    group.add_argument("--decay-fraction", type=positive_float, help="of the run, wsd's final decay to 0")
    group.add_argument("--augment", action=argparse.BooleanOptionalAction, help="random crops and flips")
    group.add_argument(
        "--crop-padding", type=non_negative_int, help="pixels around the image to crop from; 0: flips only"
    )
    group.add_argument(
        "--label-smoothing",
        type=non_negative_float,
        help="move this share of each target's probability onto the other classes, e.g. 0.1",
    )
    group.add_argument("--ema-decay", type=positive_float, help="keep an average of the weights (e.g. 0.999)")


def recipe_from(args: argparse.Namespace, base: Recipe) -> Recipe:
    """The base recipe with the parts given on the command line changed."""
    return dataclasses.replace(
        base, **{part: getattr(args, part) for part in PARTS if getattr(args, part) is not None}
    )


def data_settings(args: argparse.Namespace, seed: int) -> DataSettings:
    return DataSettings(
        source=args.data,
        root=args.data_root,
        val_size=args.val_size,
        max_train_images=args.max_train_images,
        seed=seed,
    )


# How a write fails once its reader is gone: a closed terminal (EIO), a pipe whose reader left
# (EPIPE, as `| head` does), a log file on a full disk.
OUTPUT_GONE = frozenset({errno.EIO, errno.EPIPE, errno.ENOSPC, errno.EFBIG, errno.EDQUOT})


class SurvivingStream:
    """stdout or stderr for a command that outlives its output: once a write finds the terminal,
    pipe or disk gone, the stream's file descriptor is pointed at os.devnull, as under nohup, and the
    command carries on to its own end. Ray's and MLflow's printing go through it too."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._guarded(self._stream.write, text)
        return len(text)

    def writelines(self, lines: list[str]) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        self._guarded(self._stream.flush)

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...: the stream's own
        return getattr(self._stream, name)

    def _guarded(self, write: Callable[..., Any], *args: Any) -> None:
        try:
            write(*args)
        except OSError as error:
            if error.errno not in OUTPUT_GONE:
                raise
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())  # what the buffer still holds lands there too
            os.close(devnull)
            with contextlib.suppress(OSError):
                self._stream.flush()


def _devnull_at(fd: int) -> TextIO:
    """For a command started with this descriptor closed (`>&-`): /dev/null there, so that neither
    Python nor the next file opened (a database, say) takes the place of the output."""
    devnull = os.open(os.devnull, os.O_WRONLY)  # the lowest free descriptor: fd itself, if it is free
    if devnull != fd:
        os.dup2(devnull, fd)
        os.close(devnull)
    return open(fd, "w", buffering=1, closefd=False)


def run_command(prog: str, main: Callable[[], int]) -> NoReturn:
    """Runs a command's main; bad input (exit 2) and MLflow failures (exit 3) become one line on stderr.
    Output that goes away (a closed terminal or pipe) is never fatal: see SurvivingStream."""
    sys.stdout = SurvivingStream(sys.stdout or _devnull_at(1))  # type: ignore[assignment]
    sys.stderr = SurvivingStream(sys.stderr or _devnull_at(2))  # type: ignore[assignment]
    try:
        code = main()
    except InputError as error:
        sys.stderr.write(f"{prog}: error: {error}\n")
        code = EXIT_BAD_INPUT
    except Exception as error:
        if not is_mlflow_error(error):
            raise
        sys.stderr.write(f"{prog}: error: MLflow: {first_line(error)}\n")
        code = EXIT_TRACKING_FAILED
    # The command is done and its code decided. Python's exit restores the default handlers and then
    # takes a second or two (Ray's exit hooks): a stop signal there would end the process as killed
    # (-15), its outcome told as lost. Ignored instead, in every thread (a blocked signal would still
    # reach the threads that numpy's import starts), it dies with the process, unanswered.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    sys.exit(code)
