"""Ctrl-C and SIGTERM for a command that must clean up: SIGTERM raised as an exception, and
blocks (clean-up, copying a file) that no signal interrupts."""

from __future__ import annotations

import contextlib
import signal
import threading

# Exit codes of a run ended by a signal, as a shell reports a process killed by it.
SIGNAL_EXIT_CODES = {130: signal.SIGINT, 143: signal.SIGTERM}


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the clean-up of an interrupted run happens."""


@contextlib.contextmanager
def terminate_as_interrupt():
    """While inside, SIGTERM raises ``Terminated`` (as Ctrl-C raises ``KeyboardInterrupt``) instead
    of ending the process on the spot, which would leave the run's temporary files behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, _handler(previous))


def _handler(previous):
    """A handler that ``signal.signal`` returned, as it can be set again (``None``: set outside Python)."""
    return signal.SIG_DFL if previous is None else previous


@contextlib.contextmanager
def uninterrupted():
    """Hold Ctrl-C and SIGTERM back until the block has run (clean-up, copying a file): a signal
    that arrives meanwhile is raised again after it, to the handler it would have met.

    The handlers are swapped rather than the signals masked: a signal may be delivered to any
    thread (PyTorch's included), but Python runs its handlers in the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {}
    try:
        for kind in (signal.SIGINT, signal.SIGTERM):  # one at a time: a signal between them finds its own restored
            previous[kind] = signal.signal(kind, lambda signum, frame: arrived.append(signum))
        yield
    finally:
        for kind, handler in previous.items():
            signal.signal(kind, _handler(handler))
        if arrived:
            signal.raise_signal(arrived[0])
