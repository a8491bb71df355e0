"""What every command shares: one-line errors, number parsing, the exit codes."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import NoReturn

from trainables.errors import InputError, first_line

EXIT_OK = 0
EXIT_SOME_TRIALS_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_TRACKING_FAILED = 3
EXIT_INTERRUPTED = 130  # the shell's code for a Ctrl-C


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, not the whole usage text."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(EXIT_BAD_INPUT)


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


positive_int = _number(int, 1)
non_negative_int = _number(int, 0)
positive_float = _number(float, 0.0, inclusive=False)
non_negative_float = _number(float, 0.0)


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
