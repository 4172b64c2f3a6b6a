"""Ctrl-C at safe points only. Inside `deferred_interrupts()` a first SIGINT is noted instead of raised; the code
checks `guard.pending` where its state is whole (between training steps, after a checkpoint) and stops there, and
the block raises KeyboardInterrupt on exit. A second Ctrl-C stops at once (nothing is saved then)."""

from __future__ import annotations

import contextlib
import signal
import sys
import threading


class InterruptGuard:
    def __init__(self):
        self.pending = False

    def handle(self, signum, frame):
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True
        print("\ninterrupt: stopping at the next safe point (Ctrl-C again to stop at once, without saving)",
              file=sys.stderr, flush=True)


@contextlib.contextmanager
def deferred_interrupts():
    """Yield an InterruptGuard; SIGINT only sets `pending` until the block ends (signals reach the main thread
    only: elsewhere the guard is inert)."""
    guard = InterruptGuard()
    if threading.current_thread() is not threading.main_thread():
        yield guard
        return
    previous = signal.signal(signal.SIGINT, guard.handle)
    try:
        yield guard
    finally:
        signal.signal(signal.SIGINT, previous)
    if guard.pending:
        raise KeyboardInterrupt
