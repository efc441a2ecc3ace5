"""How distpg's commands stop on a signal: SIGTERM and SIGHUP stop a command as Ctrl-C does (a KeyboardInterrupt
with the signal's name, exit status 128 + its number), its cleanup (actors, a local Ray runtime) is not cut short by
a second signal, and a terminal that hung up does not end the cleanup at its first print. Imports neither Ray nor
pyarrow: `distpg bench sampler` runs where only torch is installed."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

# the signals that stop a run as Ctrl-C does (KeyboardInterrupt with the signal's name; exit status 128 + its number)
# where the process has not been told to ignore them: SIGTERM (`kill`, `timeout`, a scheduler's stop) and SIGHUP
# (the terminal closed: an ssh connection dropped, a terminal window shut)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
# set by `signals_interrupt`'s handler to the signal's name: one that lands inside a blocking Ray call (ray.get,
# ray.wait) comes out of it as a bare KeyboardInterrupt (Ray raises its own on the pending signal), without the name
SIGNALLED: list[str] = []
# standard input, output and error where they were a terminal when the handlers were set (see `off_hung_up_terminal`)
TTYS: list[int] = []


def off_hung_up_terminal() -> None:
    """Point those of stdin, stdout and stderr that were a terminal and are no longer one (it hung up: its reads and
    writes now fail with EIO, which would cut a run's cleanup short at its first print) at /dev/null. A SIGHUP
    sent by `kill -HUP` to a run whose terminal is still open leaves them as they are: the hint is still read."""
    gone = [fd for fd in TTYS if not os.isatty(fd)]
    if gone:
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in gone:
            os.dup2(devnull, fd)
        os.close(devnull)


def signals_interrupt() -> dict | None:
    """Until the returned handlers are put back ({signal: handler}, see `put_back`): SIGTERM and SIGHUP raise
    KeyboardInterrupt("SIGTERM" / "SIGHUP") in the main thread, so that the run stops as on Ctrl-C (actors closed,
    a local runtime shut down, the last checkpoint kept) instead of dying in Ray's crash handler (SIGTERM) or at
    once (SIGHUP: Python's default action; the runtime's dashboard and runtime-env agents outlived it by a minute).
    A SIGHUP first takes the run off its hung-up terminal (`off_hung_up_terminal`). A signal the process ignores
    (SIGHUP under `nohup`) or that something other than Python handles is left as it is. Set before `ray.init`
    and again after it (it installs its own SIGTERM handler). A second signal while the run cleans up (a scheduler
    or `kill` repeating itself) is said and ignored until the caller puts the handlers back: raised in the middle
    of the cleanup it would leave the local runtime's processes behind. None off the main thread (where Python
    cannot handle signals)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    TTYS[:] = [fd for fd in (0, 1, 2) if os.isatty(fd)]
    previous = {}
    for sig in STOP_SIGNALS:
        if sig != signal.SIGTERM and signal.getsignal(sig) not in (signal.SIG_DFL, interrupt_handler):
            continue  # ignored (nohup), or handled by the program that runs distpg
        previous[sig] = signal.signal(sig, interrupt_handler)
    return {sig: signal.SIG_DFL if h is None else h for sig, h in previous.items()}  # None: not set from Python


def interrupt_handler(signum, frame):
    """`signals_interrupt`'s handler."""
    for sig in STOP_SIGNALS:  # until the cleanup installs it for SIGINT too
        if signal.getsignal(sig) is interrupt_handler:
            signal.signal(sig, while_stopping_handler)
    off_hung_up_terminal()
    SIGNALLED[:] = [signal.Signals(signum).name]
    raise KeyboardInterrupt(SIGNALLED[0])


def stop_signal(e: KeyboardInterrupt) -> signal.Signals | None:
    """The signal (SIGTERM, SIGHUP) that a KeyboardInterrupt stands for (`interrupt_handler` raises it with the signal's
    name); None for a Ctrl-C."""
    return next((s for s in STOP_SIGNALS if e.args == (s.name,)), None)


def as_signalled(e: KeyboardInterrupt) -> KeyboardInterrupt:
    """`e`, or where it is the bare KeyboardInterrupt that Ray raised out of a blocking call on a signal that
    `interrupt_handler` took (SIGNALLED), one with that signal's name."""
    return KeyboardInterrupt(SIGNALLED[0]) if SIGNALLED and e.args != tuple(SIGNALLED) else e


def how_stopped(e: KeyboardInterrupt) -> str:
    """'stopped by SIGTERM' / 'stopped by SIGHUP', or 'interrupted' (Ctrl-C), as distpg says a stop (a bare
    KeyboardInterrupt that Ray raised on one of those signals included: `as_signalled`)."""
    sig = stop_signal(as_signalled(e))
    return f"stopped by {sig.name}" if sig is not None else "interrupted"


def put_back(handlers: dict) -> None:
    """Set the handlers `signals_interrupt` (or `said_and_ignored_while_stopping`) returned. Where that puts back an
    enclosing command's `interrupt_handler` after a signal stopped the run inside it (`distpg scale`'s), the command
    is stopping too: the signal gets `while_stopping_handler`, so that a repeat does not cut its cleanup short."""
    for sig, handler in handlers.items():
        signal.signal(sig, while_stopping_handler if handler is interrupt_handler and SIGNALLED else handler)


@contextmanager
def kept_across_ray_init() -> Iterator[None]:
    """Around a `ray.init`: where `signals_interrupt` had set its handlers, they are set again after it (ray.init
    puts Ray's own SIGTERM handler, its crash report, in place of theirs)."""
    ours = signal.getsignal(signal.SIGTERM) is interrupt_handler
    yield
    if ours:
        signals_interrupt()


@contextmanager
def ctrl_c_after_it() -> Iterator[None]:
    """A Ctrl-C (SIGINT) during this block takes effect at its end (main thread only). Ray's processes ignore a
    terminal's Ctrl-C, so a local runtime that `ray.init` is starting finishes starting and is then stopped whole;
    interrupted halfway, it left the raylet's dashboard and runtime-env agents running for about a minute."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)
    if pressed:
        raise KeyboardInterrupt


def while_stopping_handler(signum, frame):
    """The handler of SIGINT, SIGTERM and SIGHUP while a run stops: said (where the terminal is still there), and
    ignored."""
    off_hung_up_terminal()
    try:
        print(f"distpg: {signal.Signals(signum).name} while stopping; ignored (cleaning up)", file=sys.stderr,
              flush=True)
    except OSError:  # a terminal hung up and not found so (no SIGHUP's handler ran): the cleanup goes on
        pass


def said_and_ignored_while_stopping(handlers: dict) -> dict:
    """From here until the caller puts the returned handlers back: Ctrl-C (SIGINT) and the signals of `handlers`
    (those `signals_interrupt` set) are said and ignored (main thread only), so that the run's cleanup (actors,
    the local runtime) is not cut short: a Ctrl-C pressed twice, or after a SIGTERM, left the runtime's dashboard
    and runtime-env agents running and the exit status 1. Returns {SIGINT: its handler}; the caller puts
    `handlers` back too."""
    for sig in handlers:
        if signal.getsignal(sig) is not None:  # None: a handler not set from Python, left as it is
            signal.signal(sig, while_stopping_handler)
    previous = signal.signal(signal.SIGINT, while_stopping_handler)
    return {signal.SIGINT: signal.default_int_handler if previous is None else previous}


@contextmanager
def signals_stop_command() -> Iterator[None]:
    """For a command made of several runs or measurements (`distpg bench`, `distpg scale`): while the block runs,
    SIGTERM and SIGHUP stop it as Ctrl-C does (`signals_interrupt`; distpg's `ray.init` calls keep them so:
    `kept_across_ray_init`), and the handlers are put back at the end (a bare KeyboardInterrupt that Ray raised on
    one of them is said as that signal: `as_signalled`). Before, `distpg bench` ended in Ray's SIGTERM handler (exit
    status 15, the results measured so far lost) and died at once on SIGHUP, and `distpg scale` died on a SIGHUP
    between two of its runs."""
    SIGNALLED.clear()
    handlers = signals_interrupt()
    try:
        yield
    finally:
        if handlers is not None:
            put_back(handlers)
