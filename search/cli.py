"""What every command shares: one-line errors, number parsing, the exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from trainables.config import DataSettings
from trainables.errors import InputError, first_line

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
    try:
        tflop = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of TFLOP, or none") from None
    if not math.isfinite(tflop) or tflop <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0 TFLOP, or none")
    return tflop


def duration(text: str) -> float:
    """Seconds, from 90, 90s, 10m or 1.5h."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], units[text[-1]]) if text[-1:] in units else (text, 1)
    try:
        seconds = float(number) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 10m or 1.5h") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be more than 0")
    return seconds


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


def data_settings(args: argparse.Namespace, seed: int) -> DataSettings:
    return DataSettings(
        source=args.data,
        root=args.data_root,
        val_size=args.val_size,
        max_train_images=args.max_train_images,
        seed=seed,
    )


def run_command(prog: str, main: Callable[[], int]) -> NoReturn:
    """Runs a command's main; bad input (exit 2) and MLflow failures (exit 3) become one line on stderr."""
    try:
        code = main()
    except InputError as error:
        sys.stderr.write(f"{prog}: error: {error}\n")
        code = EXIT_BAD_INPUT
    except Exception as error:
        # MLflow is imported here, not at the top: bad options should not wait for it to load.
        from mlflow.exceptions import MlflowException

        if not isinstance(error, MlflowException):
            raise
        sys.stderr.write(f"{prog}: error: MLflow: {first_line(error)}\n")
        code = EXIT_TRACKING_FAILED
    sys.exit(code)
