"""Optuna define-by-run search spaces: the assignment's three by name, a user's own by
FILE.py:FUNCTION or MODULE:FUNCTION, with --range and --fix from the command line."""

from spaces.loading import get_space, load_space, parse_fix, parse_range, space_names, space_record
from spaces.space import Range, SearchSpace, register_space

__all__ = [
    "Range",
    "SearchSpace",
    "get_space",
    "load_space",
    "parse_fix",
    "parse_range",
    "register_space",
    "space_names",
    "space_record",
]
