"""SIGTERM and SIGHUP stop a sweep as Ctrl-C does.

Batch schedulers, `docker stop` and `kill` send SIGTERM; a closed terminal sends
SIGHUP. Left to Ray's handler, either one exits at once: runs stay RUNNING and no
resume command is printed. Here the first one asks Tune to end the sweep the way
Ctrl-C does (a last snapshot, runs marked KILLED, the resume command printed), and
a second one leaves at once, as a second Ctrl-C does.

A signal sent to the whole process group (a batch scheduler, a closed terminal)
must not reach the Ray processes the sweep started: they would die at once, and the
driver's next call into Ray would end it with exit 1, its runs left RUNNING. Ray
starts its processes with SIGINT blocked, so that Ctrl-C reaches the driver alone;
`held_back` does the same for SIGTERM and SIGHUP, since a process inherits the
signals blocked in the thread that starts it. Should Ray die anyway, a watchdog
closes the runs itself after a grace period (`abandon`), and leaves with the
signal's exit code.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def held_back() -> Iterator[None]:
    """Blocks SIGTERM and SIGHUP in this thread meanwhile, and for good in the processes it starts.

    One that arrives meanwhile waits, and is handled as soon as the block ends.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def deferred_stops() -> Iterator[None]:
    """Meanwhile (Ray's start, in the main thread), a stop signal or Ctrl-C is only noted, and acted
    on at the end, as KeyboardInterrupt or SweepStopped. One that cut ray.init short left Ray half
    started, its core worker out of ray.shutdown's reach, and the process's exit then crashed in
    its teardown (SIGSEGV). The handlers Ray sets for these signals meanwhile are not put in: ours
    replace them as soon as it has started (as Ray's own DeferSigint keeps SIGINT's)."""
    signals, received = (signal.SIGINT, *STOP_SIGNALS), []

    def note(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous = {signum: signal.signal(signum, note) for signum in signals}
    set_handler = signal.signal

    def keep_noting(signum: int, handler: Any) -> Any:
        if signum in signals and threading.current_thread() is threading.main_thread():
            return note
        return set_handler(signum, handler)

    signal.signal = keep_noting  # type: ignore[assignment]
    try:
        yield
    finally:
        signal.signal = set_handler
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if received:
        if received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        raise SweepStopped(received[0])


@contextlib.contextmanager
def keeping_stop_handlers(poll_s: float = 0.005) -> Iterator[None]:
    """Meanwhile, a thread puts the process's handlers of SIGTERM and SIGHUP back whenever C code
    resets them (Ray's shutdown does), so that a signal then is still ours, not the default's
    (which would kill the process). On Linux, through libc's sigaction; elsewhere, nothing."""
    if sys.platform != "linux":
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    size = 256  # more than glibc's struct sigaction: it is kept and put back whole, never read
    kept = {signum: ctypes.create_string_buffer(size) for signum in STOP_SIGNALS}
    for signum, action in kept.items():
        libc.sigaction(signum, None, action)
    done = threading.Event()

    def keep() -> None:
        now = ctypes.create_string_buffer(size)
        while not done.wait(poll_s):
            for signum, action in kept.items():
                libc.sigaction(signum, None, now)
                if now.raw[:8] != action.raw[:8]:  # the handler's address, the struct's first field
                    libc.sigaction(signum, action, None)

    keeper = threading.Thread(target=keep, name="keep-stop-handlers", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        done.set()
        keeper.join()
        for signum, action in kept.items():
            libc.sigaction(signum, action, None)


class SweepStopped(BaseException):
    """A stop signal arrived where the sweep could not end gracefully: before Tune ran, or twice.
    A BaseException, as KeyboardInterrupt is: no `except Exception` on the way may swallow it."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


class StopSignals:
    """While in effect (all of search.run's life), no SIGTERM or SIGHUP ends the process by the
    default action, which would leave runs RUNNING and say nothing. Before the sweep runs, the first
    raises SweepStopped; while Tune runs, it asks Tune for the graceful stop; once the sweep is over
    (`over`), it is only noted, so the outcome stands and its summary is finished. A second one
    raises SweepStopped at once."""

    GRACE_S = 20.0  # a graceful stop takes a few seconds; with Ray gone, it never ends

    def __init__(self) -> None:
        self.received: int | None = None
        # What to do, in order, before leaving when a graceful stop never ends: close the runs
        # without Ray, print how to resume.
        self.on_abandon: list[Callable[[int], None]] = []
        self._previous: dict[int, Any] = {}
        self._ended = threading.Event()  # the sweep is over: no watchdog needs to abandon it

    def __enter__(self) -> StopSignals:
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def over(self) -> None:
        """The sweep has ended, its outcome read: a stop signal now changes nothing but the speed."""
        self._ended.set()

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self._ended.set()
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = self.received or signum
        if first and self._ended.is_set():
            return  # the outcome stands; the summary and the last words follow at once
        # Tune listens for SIGUSR1 as for Ctrl-C while it runs (and only then: otherwise
        # SIGUSR1 would end the process).
        if first and signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, signal.SIG_IGN, None):
            threading.Thread(target=self._watch, args=(signum,), daemon=True).start()
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        raise SweepStopped(self.received)

    def _watch(self, signum: int) -> None:
        if self._ended.wait(self.GRACE_S):
            return
        for step in self.on_abandon:
            with contextlib.suppress(Exception):  # leaving is what matters now
                step(signum)
        os._exit(128 + signum)  # the main thread is stuck in Ray: there is no clean exit left
