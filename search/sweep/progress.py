"""Live progress of a sweep: one status line instead of pages of Tune's tables.

On a terminal the line is rewritten in place, at most once a second. When the
output is a file or a pipe (CI, a log), it prints plain lines instead: one when a
trial ends, and one at least every minute.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from ray import tune

from search.tracking.callback import run_name, trained_tflop
from spaces import SearchSpace
from trainables.names import DIVERGED, EPOCH, METRIC


@dataclass(frozen=True)
class SweepStatus:
    """A snapshot of a sweep, as the status line shows it."""

    done: int
    running: int
    pending: int
    failed: int
    diverged: int  # among the done
    best_accuracy: float | None
    best_trial: str  # the best trial's name, as its MLflow run has it
    elapsed_s: float
    remaining_s: float | None  # None until there is progress to extrapolate from
    tflop: float = 0.0  # the training all the trials did so far
    compute_budget: float = math.inf  # --compute-budget; shown when there is one

    def line(self, width: int | None = None) -> str:
        """Most telling first, so a narrow terminal cuts only the best trial's config. Where more
        would be cut (at 80 columns, say), a short form keeps the best accuracy in view."""
        eta = "?" if self.remaining_s is None else f"~{_duration(self.remaining_s)}"
        counts = {"done": self.done, "running": self.running, "pending": self.pending}
        counts |= {"failed": self.failed, "diverged": self.diverged}
        parts = [
            f"[{_duration(self.elapsed_s)}] trials: "
            + ", ".join(f"{n} {word}" for word, n in counts.items()),
            f"ETA {eta}",
        ]
        if math.isfinite(self.compute_budget):
            parts.append(f"{self.tflop:.1f} of {self.compute_budget:g} TFLOP")
        if self.best_accuracy is not None:
            parts.append(f"best {METRIC} {self.best_accuracy:.4f} ({self.best_trial})")
        whole = " | ".join(parts)
        if width is None:
            return whole
        up_to_the_best_trials_number = len(whole) - len(self.best_trial) + len(self.best_trial.split(" ")[0])
        if up_to_the_best_trials_number < width:  # at most the best trial's config is cut
            return whole[: width - 1]
        # Short: no spare words, no counts of 0 but done's, the best trial by its number, and the
        # best accuracy before the time left and the compute spent.
        shown = [f"{n} {word}" for word, n in counts.items() if n or word == "done"]
        short = [f"[{_duration(self.elapsed_s)}] " + ", ".join(shown)]
        if self.best_accuracy is not None:
            short.append(f"best {self.best_accuracy:.4f} ({self.best_trial.split(' ')[0]})")
        short.append(f"ETA {eta}")
        if math.isfinite(self.compute_budget):
            short.append(f"{self.tflop:.1f}/{self.compute_budget:g} TFLOP")
        return " | ".join(short)[: width - 1]


class SweepProgress(tune.Callback):
    """Prints the sweep's status: a line rewritten in place on a terminal, plain lines otherwise."""

    REFRESH_S = 1.0
    HEARTBEAT_S = 60.0

    def __init__(
        self,
        space: SearchSpace,
        num_samples: int,
        max_epochs: int,
        compute_budget: float = math.inf,
        stream: TextIO | None = None,
    ) -> None:
        self.space = space
        self.num_samples = num_samples
        self.max_epochs = max_epochs
        self.compute_budget = compute_budget  # TFLOP: the sweep may end here, before num_samples
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty()
        self._started = time.monotonic()
        self._start_fraction: float | None = None  # progress already made when this run began
        self._last_print = -float("inf")

    # Tune pickles its callbacks with the experiment: keep the settings, not the stream.
    def __getstate__(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "num_samples": self.num_samples,
            "max_epochs": self.max_epochs,
            "compute_budget": self.compute_budget,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(**state)

    def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
        every = self.REFRESH_S if self.interactive else self.HEARTBEAT_S
        if time.monotonic() - self._last_print >= every:
            self._show(self.status(trials))

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        epoch = last.get(EPOCH, 0)
        if last.get(DIVERGED):
            ended = "diverged"
        else:  # the scheduler stops a weak trial at a rung, often inside an epoch
            ended = "finished" if epoch >= self.max_epochs else "stopped early"
        accuracy = last.get(METRIC)
        score = f": {METRIC} {accuracy:.4f}" if accuracy is not None else ""
        event = f"{run_name(trial, self.space)} {ended} at epoch {epoch:.3g}{score}"
        self._show(self.status(trials, ending={trial.trial_id: "TERMINATED"}), event)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        event = f"{run_name(trial, self.space)} failed"
        self._show(self.status(trials, ending={trial.trial_id: "ERROR"}), event)

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        # Nothing is left, whatever the extrapolation says: a budget can end a sweep early.
        self._show(dataclasses.replace(self.status(trials), remaining_s=0.0))
        if self.interactive:
            self.stream.write("\n")
            self.stream.flush()

    def status(self, trials: list, ending: dict[str, str] | None = None) -> SweepStatus:
        """`ending`: trial id -> the status Tune is about to give it (its hooks run just before)."""
        ending = ending or {}
        by_status: dict[str, list] = {}
        for trial in trials:
            by_status.setdefault(ending.get(trial.trial_id, trial.status), []).append(trial)
        done = by_status.get("TERMINATED", [])
        scored = [
            (trial.metric_analysis[METRIC]["max"], trial)
            for trial in trials
            if METRIC in trial.metric_analysis
        ]
        best_accuracy, best = max(scored, key=lambda pair: pair[0], default=(None, None))
        tflop = trained_tflop(trials)
        # Whichever ends the sweep first: its trials, or its compute budget.
        fraction = max(self._fraction(trials, ending), min(1.0, tflop / self.compute_budget))
        if self._start_fraction is None:
            self._start_fraction = fraction
        elapsed = time.monotonic() - self._started
        gained = fraction - self._start_fraction
        return SweepStatus(
            done=len(done),
            running=len(by_status.get("RUNNING", [])),
            pending=self.num_samples
            - len(trials)
            + sum(len(by_status.get(waiting, [])) for waiting in ("PENDING", "PAUSED")),
            failed=len(by_status.get("ERROR", [])),
            diverged=sum(bool((trial.last_result or {}).get(DIVERGED)) for trial in done),
            best_accuracy=best_accuracy,
            best_trial=run_name(best, self.space) if best is not None else "",
            elapsed_s=elapsed,
            remaining_s=elapsed * (1 - fraction) / gained if gained > 0 else None,
            tflop=tflop,
            compute_budget=self.compute_budget,
        )

    def _fraction(self, trials: list, ending: dict[str, str]) -> float:
        """How much of the sweep is done: an ended trial counts whole, a running one by its epochs.

        ASHA stops most trials early, so this undercounts the work left behind and the
        estimate errs long at first, then settles.
        """
        total = 0.0
        for trial in trials:
            if ending.get(trial.trial_id, trial.status) in ("TERMINATED", "ERROR"):
                total += 1.0
            else:
                total += min(1.0, (trial.last_result or {}).get(EPOCH, 0) / self.max_epochs)
        return total / self.num_samples

    def _show(self, status: SweepStatus, event: str | None = None) -> None:
        self._last_print = time.monotonic()
        if self.interactive:
            line = status.line(shutil.get_terminal_size().columns)
            if event:  # an event scrolls up on a line of its own; the status line stays last
                self.stream.write(f"\r\x1b[K{event}\n")
            self.stream.write("\r\x1b[K" + line)
        else:
            self.stream.write((f"{event} | " if event else "") + status.line() + "\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
