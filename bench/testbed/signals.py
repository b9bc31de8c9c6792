"""The signals that take a testbed down, and who receives them.

SIGTERM and SIGHUP raise SystemExit in the main thread while a bed is up
(`signals_unwind`), Ctrl-C raises KeyboardInterrupt there as always, and every other
thread of the process blocks all three (`block_in_worker_thread`). The kernel hands a
process-directed signal to any thread that does not block it, while Python runs its
handler in the main thread only, between bytecodes: one taken by a worker thread would
leave a main thread blocked in waitpid() asleep until its child exits, the bed up all
that time (a CI run hung on it).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

UNWIND_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # SystemExit(128 + signum) while inside
Handler = Callable[[int, FrameType | None], Any] | int | None


def _exit_on(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP raise SystemExit while inside (main thread only), so `finally`
    blocks run; the previous handlers are back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Handler] = {s: signal.signal(s, _exit_on) for s in UNWIND_SIGNALS}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def block_in_worker_thread() -> None:
    """Called first thing in a testbed's own threads: the signals that take the bed down
    are then delivered to the main thread, which acts on them."""
    signal.pthread_sigmask(signal.SIG_BLOCK, (signal.SIGINT, *UNWIND_SIGNALS))
