"""`--space`, `--range` and `--fix` made into a SearchSpace, checked before anything runs.

`--space` names one of the assignment's spaces (`nesterov`), a function in the user's file
(`path/to/my_spaces.py:wide`) or in a module on the path (`my_package.spaces:wide`): one
decorated with `register_space`, or a plain function of an Optuna trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import importlib
import importlib.util
import math
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
    distribution_to_json,
)

from spaces import assignment
from spaces.space import CONFIG_FIELDS, Range, RecordingTrial, SearchSpace
from trainables.errors import InputError

# The assignment's three parts, by their short names.
ASSIGNMENT_SPACES = {
    define.search_space.name: define.search_space
    for define in (assignment.barebones, assignment.sgd, assignment.nesterov)
}


def space_names() -> list[str]:
    return sorted(ASSIGNMENT_SPACES)


def get_space(reference: str) -> SearchSpace:
    """The space --space names, as written; no --range or --fix."""
    return load_space(reference, (), ())


@functools.lru_cache(maxsize=64)
def load_space(
    reference: str, ranges: tuple[Range, ...] = (), fixed: tuple[tuple[str, Any], ...] = ()
) -> SearchSpace:
    """The space, with the command line's ranges and pins applied; an InputError says what is wrong
    with any of them. Cached: a space's function is run again only for another reference."""
    base, resolved = _resolve(reference)
    _check_space(base)
    fixed = _check_overrides(base, ranges, fixed)
    space = SearchSpace(
        base.name,
        base.summary,
        base.define,
        base.first_point,
        base.params_of,
        reference=resolved,
        ranges=ranges,
        fixed=fixed,
    )
    with _running(space):
        first_point, notes = first_point_within(space, base.first_point)
    space = dataclasses.replace(space, first_point=first_point, notes=tuple(notes))
    _check_space(space)
    with _running(space):
        space_record(space)  # at both ends of every range, the space builds a valid config
    if not space.distributions():
        pinned = f" once --fix pins {', '.join(name for name, _ in fixed)}" if fixed else ""
        raise InputError(f"space {space.name} searches nothing{pinned}: a sweep needs a parameter to search")
    return space


@contextlib.contextmanager
def _running(space: SearchSpace) -> Iterator[None]:
    """Meanwhile the space's function runs: whatever it raises, or a config it returns that fails
    validation, is one line that names the space (and where in the user's file)."""
    try:
        yield
    except InputError as error:
        raise InputError(f"space {space.name} returns a config that fails validation: {error}") from None
    except Exception as error:
        code = getattr(space.define, "__code__", None)
        where = _where_in(error, Path(code.co_filename)) if code is not None else space.name
        raise InputError(f"space {space.name} failed at {where}: {_one_line(error)}") from None


def _resolve(reference: str) -> tuple[SearchSpace, str]:
    """The space a reference names, and the reference resolved (a file's path made absolute)."""
    if reference in ASSIGNMENT_SPACES:
        return ASSIGNMENT_SPACES[reference], reference
    where, colon, function = reference.rpartition(":")
    if not colon or not where or not function:
        raise InputError(
            f"unknown space {reference!r}; known spaces: {', '.join(space_names())} "
            "(or FILE.py:FUNCTION, MODULE:FUNCTION for your own)"
        )
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        module, resolved = _import_file(path), f"{path}:{function}"
    else:
        module, resolved = _import_module(where), reference
    define = getattr(module, function, None)
    if define is None or not callable(define):
        found = sorted(name for name, value in vars(module).items() if _is_space(value))
        raise InputError(
            f"{where} has no function {function!r}" + (f" (its spaces: {', '.join(found)})" if found else "")
        )
    marked = getattr(define, "search_space", None)
    if isinstance(marked, SearchSpace):
        return marked, resolved
    summary = ((define.__doc__ or "").strip().splitlines() or [f"{function}, from {where}"])[0]
    return SearchSpace(function, summary, define), resolved


def _is_space(value: Any) -> bool:
    return isinstance(getattr(value, "search_space", None), SearchSpace)


def _import_file(path: Path) -> ModuleType:
    """The user's file as a module, under a name of its path (in sys.modules while it runs, as
    dataclasses in it need). Run again on each load: what it holds now is what is swept."""
    if not path.is_file():
        raise InputError(f"no space file {path}")
    name = "user_space_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None  # a .py file always has a loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as error:
        del sys.modules[name]
        raise InputError(f"{path}:{error.lineno}: syntax error: {error.msg}") from None
    except Exception as error:
        del sys.modules[name]
        raise InputError(f"{_where_in(error, path)}: importing it failed: {_one_line(error)}") from None
    return module


def _import_module(name: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        raise InputError(f"no module {error.name!r} for the space {name!r} (is it on PYTHONPATH?)") from None
    except SyntaxError as error:
        raise InputError(f"{error.filename}:{error.lineno}: syntax error: {error.msg}") from None
    except Exception as error:
        raise InputError(f"importing {name} failed: {_one_line(error)}") from None


def _where_in(error: BaseException, path: Path) -> str:
    """FILE:LINE of the error's deepest frame in the user's file (the file alone if none)."""
    lines = [
        frame.lineno for frame in traceback.extract_tb(error.__traceback__) if frame.filename == str(path)
    ]
    return f"{path}:{lines[-1]}" if lines else str(path)


def _one_line(error: BaseException) -> str:
    message = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def _check_space(space: SearchSpace) -> None:
    """The space's function runs, suggests only names the config knows (or that its params_of
    derives), and builds a config that passes validation, at its first point."""
    recorder = RecordingTrial(space.first_point)
    with _running(space):
        space.distributions()
        config = space.config_for(recorder)  # type: ignore[arg-type]
    known = CONFIG_FIELDS | set(space.params_of(config))
    unknown = sorted(set(recorder.params) - known)
    if unknown:
        raise InputError(
            f"space {space.name} suggests {', '.join(map(repr, unknown))}, which the trial config does not "
            f"know (it knows {', '.join(sorted(CONFIG_FIELDS))})"
        )


def _check_overrides(
    space: SearchSpace, ranges: tuple[Range, ...], fixed: tuple[tuple[str, Any], ...]
) -> tuple[tuple[str, Any], ...]:
    """Refuses a --range or --fix the space cannot take; the pins, a whole number made an int."""
    with _running(space):
        searched, constants = space.distributions(), constant_fields(space)
    for range_ in ranges:
        distribution = searched.get(range_.name)
        if distribution is None:
            raise InputError(
                f"--range {range_}: space {space.name} does not search {range_.name!r} "
                f"(it searches {', '.join(sorted(searched)) or 'nothing'})"
            )
        if isinstance(distribution, CategoricalDistribution):
            raise InputError(
                f"--range {range_}: {range_.name} is a choice of {list(distribution.choices)}; --fix it"
            )
        if isinstance(distribution, IntDistribution) and not all(
            float(edge).is_integer() for edge in (range_.low, range_.high)
        ):
            raise InputError(f"--range {range_}: {range_.name} is a whole number, so are its LOW and HIGH")
        step = getattr(distribution, "step", None)
        if range_.log and step not in (None, 1):
            raise InputError(
                f"--range {range_}: {range_.name} moves in steps of {step:g}, which a log range cannot"
            )
    for name, value in fixed:
        if name not in searched and name not in constants:
            raise InputError(
                f"--fix {name}={value}: space {space.name} neither searches {name!r} nor sets it to a "
                f"constant (it searches {', '.join(sorted(searched)) or 'nothing'})"
            )
        if name in searched and not _fits_kind(searched[name], value):
            raise InputError(f"--fix {name}={value}: {name} is {describe(searched[name])}")
    if len({name for name, _ in fixed}) < len(fixed) or len({r.name for r in ranges}) < len(ranges):
        raise InputError("--range and --fix name each parameter once")
    both = {name for name, _ in fixed} & {range_.name for range_ in ranges}
    if both:
        raise InputError(f"{', '.join(sorted(both))}: given both a --range and a --fix")
    whole = {name for name, distribution in searched.items() if isinstance(distribution, IntDistribution)}
    whole |= {
        name for name, value in constants.items() if isinstance(value, int) and not isinstance(value, bool)
    }
    return tuple((name, int(value) if name in whole else value) for name, value in fixed)


def _fits_kind(distribution: BaseDistribution, value: Any) -> bool:
    if isinstance(distribution, CategoricalDistribution):
        return value in distribution.choices
    if isinstance(distribution, IntDistribution):
        return isinstance(value, int | float) and float(value).is_integer()
    return isinstance(value, int | float)


def constant_fields(space: SearchSpace) -> dict[str, Any]:
    """The config fields that are one value wherever the space samples (nesterov's kernel_1 5, a
    --fix), seen at both ends of its ranges; those it searches or derives (nesterov's lr) differ."""
    low, high = (
        space.config_for(
            RecordingTrial({name: _end_of(d, end) for name, d in space.distributions().items()})
        ).to_dict()  # type: ignore[arg-type]
        for end in ("low", "high")
    )
    return {name: value for name, value in low.items() if high[name] == value}


def _end_of(distribution: BaseDistribution, end: str) -> Any:
    if isinstance(distribution, CategoricalDistribution):
        return distribution.choices[0 if end == "low" else -1]
    return getattr(distribution, end)


def first_point_within(space: SearchSpace, point: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The space's first point under its ranges and pins: a pinned parameter leaves it, a value
    outside its new range is clipped to the range; and a line for each change."""
    searched = space.distributions()
    kept, notes = {}, []
    for name, value in point.items():
        if name not in searched:
            notes.append(f"first point: {name} {_show(value)} left out, --fix sets it")
            continue
        distribution = searched[name]
        if isinstance(distribution, FloatDistribution | IntDistribution):
            clipped = min(max(value, distribution.low), distribution.high)
            if clipped != value:
                notes.append(
                    f"first point: {name} {_show(value)} clipped to {_show(clipped)}, the edge of its --range"
                )
            value = clipped
        kept[name] = value
    return kept, notes


def _show(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def describe(distribution: BaseDistribution) -> str:
    """A distribution as a person reads it: `int 16..128, log`, `float 0.5..0.95`, `one of [a, b]`."""
    if isinstance(distribution, CategoricalDistribution):
        return f"one of {list(distribution.choices)}"
    kind = "int" if isinstance(distribution, IntDistribution) else "float"
    scale = ", log" if distribution.log else ""  # type: ignore[attr-defined]
    step = getattr(distribution, "step", None)
    scale += f", step {step:g}" if step not in (None, 1) else ""
    return f"{kind} {distribution.low:g}..{distribution.high:g}{scale}"  # type: ignore[attr-defined]


def space_record(space: SearchSpace) -> dict[str, Any]:
    """The space resolved, as the sweep's identity and its parent's space.json hold it."""
    ranged = {range_.name for range_ in space.ranges}
    return {
        "space": space.reference,
        "searched": {
            name: {
                "range": describe(distribution),
                "from": "--range" if name in ranged else "the space",
                "distribution": distribution_to_json(distribution),  # exact, for the identity
            }
            for name, distribution in sorted(space.distributions().items())
        },
        "fixed": {name: value for name, value in space.fixed},
        "constants": constant_fields(space),
        "first_point": space.first_point,
    }


def parse_range(text: str) -> Range:
    """`NAME=LOW:HIGH[:log]`, refused in one line where it cannot be a range."""
    name, equals, spec = text.partition("=")
    parts = spec.split(":")
    log = parts[-1] == "log"
    if log:
        parts = parts[:-1]
    if not equals or not name or len(parts) != 2:
        raise InputError(f"--range {text}: expected NAME=LOW:HIGH or NAME=LOW:HIGH:log")
    try:
        low, high = (float(part) for part in parts)
    except ValueError:
        raise InputError(f"--range {text}: LOW and HIGH must be numbers") from None
    if not (math.isfinite(low) and math.isfinite(high)):
        raise InputError(f"--range {text}: LOW and HIGH must be finite")
    if low >= high:
        raise InputError(
            f"--range {text}: LOW must be below HIGH (an empty range searches nothing; --fix pins)"
        )
    if log and low <= 0:
        raise InputError(f"--range {text}: a log range needs LOW > 0")
    return Range(name, low, high, log)


def parse_fix(text: str) -> tuple[str, Any]:
    """`NAME=VALUE`: a number where it reads as one (an int where whole), else the text."""
    name, equals, value = text.partition("=")
    if not equals or not name or not value:
        raise InputError(f"--fix {text}: expected NAME=VALUE")
    for kind in (int, float):
        try:
            number = kind(value)
        except ValueError:
            continue
        if not math.isfinite(number):
            raise InputError(f"--fix {text}: VALUE must be finite")
        return name, number
    return name, value
