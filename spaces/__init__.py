"""Optuna define-by-run search spaces, one registry. Importing the package registers them all."""

from spaces import assignment  # noqa: F401  (registers the assignment's spaces)
from spaces.registry import SearchSpace, get_space, register_space, space_names

__all__ = ["SearchSpace", "get_space", "register_space", "space_names"]
