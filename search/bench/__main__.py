"""`python -m search.bench`: the speed sections by default, --search or --final instead."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from search.bench.audit import AUDIT_IMAGES
from search.bench.fidelity import run_fidelity_benchmark
from search.bench.final import FINAL_EPOCHS, run_final_benchmark
from search.bench.speed import DEFAULT_SECTIONS, SECTIONS, run_speed_benchmark
from search.bench.strategies import STRATEGIES, run_search_benchmark
from search.cli import (
    EXIT_OK,
    OneLineParser,
    add_data_options,
    data_settings,
    default,
    non_negative_int,
    positive_int,
    run_command,
)
from search.sweep.settings import SweepSettings
from trainables.config import PRECISIONS
from trainables.errors import InputError

PROG = "search.bench"


def _seeds(text: str) -> list[int]:
    return [int(non_negative_int(part)) for part in text.split(",")]


def _sections(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",")]
    unknown = [name for name in names if name not in SECTIONS]
    if unknown:
        raise InputError(f"unknown --sections {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog=PROG, description=__doc__)
    add_data_options(parser)
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when there is one")
    parser.add_argument(
        "--sections", default=DEFAULT_SECTIONS, help=f"comma-separated, of {', '.join(SECTIONS)}"
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=2, help="epochs of each pipeline, alternated (default: 2)"
    )
    parser.add_argument("--accuracy-seeds", type=positive_int, default=3, help="seeds of the accuracy check")
    parser.add_argument("--sweep-trials", type=positive_int, default=4, help="trials of the timed sweep")
    parser.add_argument(
        "--sweep-space",
        default="sgd",
        help="space of the timed sweep (default sgd: fixed widths, even trials)",
    )
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=default(SweepSettings, "precision"),
        help="of the speedup figure, the parallel trials and the sweep (the epochs time both)",
    )
    parser.add_argument(
        "--seed", type=non_negative_int, default=default(SweepSettings, "seed"), help="of all"
    )
    parser.add_argument("--json", action="store_true", help="end with one line of JSON")
    search = parser.add_argument_group("the search benchmarks (instead of the sections)")
    which = search.add_mutually_exclusive_group()
    which.add_argument("--search", action="store_true", help="compare search strategies at equal compute")
    which.add_argument(
        "--final", action="store_true", help="compare pipelines by their final model at equal total compute"
    )
    which.add_argument(
        "--fidelity", action="store_true", help="how the long recipe's schedules score trials at ASHA's rungs"
    )
    search.add_argument("--search-seeds", type=_seeds, default="0,1,2", help="comma-separated")
    search.add_argument(
        "--final-epochs",
        type=positive_int,
        default=FINAL_EPOCHS,
        help="the final model's budget, for --final",
    )
    search.add_argument(
        "--audit-images", type=positive_int, default=AUDIT_IMAGES, help="held out of every sweep"
    )
    search.add_argument("--out", type=Path, default=Path("."), help="where their tables (JSON) and plots go")
    args = parser.parse_args(argv)
    data = data_settings(args, seed=args.seed)
    if args.search:
        figures = run_search_benchmark(data, args.search_seeds, STRATEGIES, args.out, args.audit_images)
    elif args.fidelity:
        figures = run_fidelity_benchmark(data)
    elif args.final:
        figures = run_final_benchmark(data, args.search_seeds, args.final_epochs, args.out, args.audit_images)
    else:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise InputError("--device cuda, but torch sees no CUDA device")
        figures = run_speed_benchmark(
            data,
            device,
            _sections(args.sections),
            args.repeats,
            args.seed,
            args.precision,
            args.accuracy_seeds,
            args.sweep_space,
            args.sweep_trials,
        )
    if args.json:
        print(json.dumps(figures))
    return EXIT_OK


if __name__ == "__main__":
    run_command(PROG, lambda: main(sys.argv[1:]))
