"""Ctrl-C and SIGTERM (what schedulers and pods send before killing) at safe points only. Inside
`deferred_interrupts()` a first SIGINT or SIGTERM is noted instead of raised; the code checks `guard.pending` where
its state is whole (between training steps, after a checkpoint) and stops there, and the block raises
KeyboardInterrupt on exit. A second signal stops at once (nothing is saved then). Outside such a block,
`terminate_as_interrupt()` makes SIGTERM raise KeyboardInterrupt like Ctrl-C, so the run records where it stopped."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class InterruptGuard:
    def __init__(self):
        self.pending = False

    def handle(self, signum, frame):
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True
        print(f"\ninterrupt ({signal.Signals(signum).name}): stopping at the next safe point (Ctrl-C again to stop "
              f"at once, without saving)", file=sys.stderr, flush=True)


@contextlib.contextmanager
def terminate_as_interrupt():
    """Within the block SIGTERM raises KeyboardInterrupt, as SIGINT does (in the main thread; elsewhere nothing
    changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def deferred_interrupts():
    """Yield an InterruptGuard; SIGINT and SIGTERM only set `pending` until the block ends (signals reach the main
    thread only: elsewhere the guard is inert)."""
    guard = InterruptGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous = {s: signal.signal(s, guard.handle) for s in SIGNALS}
    try:
        yield guard
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if guard.pending:
        raise KeyboardInterrupt
