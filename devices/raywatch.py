"""Watching the embedded Ray's own processes: a GCS or raylet that dies is said at once.

When the embedded Ray's GCS dies (an OOM kill, ``kill -9``), the driver's Ray core
worker ends the whole process 60 s later with exit status 1 and one line of its own log;
when its raylet dies, within a second or two. Either way a run used to stop with no line
of fleetsim's, its strategy left ``running`` in ``summary.json``.

``watch_core_processes()`` starts a daemon thread that polls the GCS and raylet that
``ray.init`` started in this process, for as long as Ray stays connected. If one ends
while Ray is still connected (a ``ray.shutdown`` disconnects first, and then stops them:
that is not a loss), it writes one line to stderr naming the process and how it ended,
records the line (``lost()``), tells the reaper that fleetsim has had its word
(``devices.reaper.farewell``), and, where a run's SIGTERM handler is set (a handler with
the attribute ``interrupts_run``, ``simulator.run``), sends SIGTERM to the main thread:
the strategy in flight is marked ``interrupted`` and the CLI ends with exit status 2, a
fault of the machine, like a full disk. (A real signal, not ``_thread.interrupt_main``: it
also ends a wait on a lock.) A raylet's loss may end the process (Ray's exit status 1)
before that; the line has been written by then. ``fleetsim run --resume`` continues.

A signal sent to the whole process group (Ctrl-C, ``kill -TERM -- -PGID``, a batch
scheduler) ends the GCS and raylet beside the driver (the raylet with exit status 0), and
the driver says so itself: its handler calls ``stand_down()``. So only a process killed
outright (SIGKILL: the OOM killer, ``kill -9``) or crashed (SIGSEGV, SIGABRT ...) is
reported at once; one that exited or was stopped by another signal is reported if the
driver has not stood down within ``STOPPED_GRACE_S`` (its handler waits for the main
thread, which may be inside a call into Ray). ``reset()`` (at the start of each run)
forgets a stand-down and a loss of an earlier run in the same process.
"""
from __future__ import annotations

import signal
import sys
import threading
import time
from typing import Any

POLL_S = 0.2
STOPPED_GRACE_S = 3.0  # for the driver's own handler of a signal sent to the whole group
_OUTRIGHT = tuple(-s for s in (signal.SIGKILL, signal.SIGSEGV, signal.SIGABRT, signal.SIGBUS, signal.SIGILL,
                                signal.SIGFPE))  # Popen return codes of a process killed outright or crashed
_lost: list[str] = []
_stood_down = threading.Event()


def stand_down() -> None:
    """The driver is ending on a signal of its own: Ray's processes ending now are not a loss."""
    _stood_down.set()


def reset() -> None:
    """A new run in this process: an earlier run's stand-down or loss does not carry over."""
    _stood_down.clear()
    _lost.clear()


def lost() -> str | None:
    """The line said when an embedded Ray process was lost, else None."""
    return _lost[0] if _lost else None


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def check(processes: dict[str, Any], connected, grace_s: float = STOPPED_GRACE_S) -> str | None:
    """The line for the first of ``processes`` (name -> ``subprocess.Popen``) that has
    ended while ``connected()`` is still true and the driver has not stood down, else None."""
    from devices.reaper import resume_hint

    for name, proc in processes.items():
        code = proc.poll()
        if code is None:
            continue
        if not connected():  # checked after the poll: a shutdown disconnects before it stops them
            return None
        if code not in _OUTRIGHT and _stood_down.wait(grace_s):
            return None  # a signal sent to the driver too, which ends the run itself
        if connected() and not _stood_down.is_set():
            return (f"fleetsim: error: Ray's {name} process (pid {proc.pid}) ended ({_how(code)}), and the run "
                    f"cannot go on without it; {resume_hint()}")
    return None


def _interrupt_run() -> None:
    """SIGTERM to the main thread, if a run's handler is set there (else nothing: a
    default SIGTERM would kill the process)."""
    if getattr(signal.getsignal(signal.SIGTERM), "interrupts_run", False):
        signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)


def watch_core_processes() -> threading.Thread | None:
    """Start the watch over the GCS and raylet of the Ray this process started (None if
    Ray was joined, not started, or its processes cannot be listed)."""
    try:
        import ray._private.ray_constants as rc
        import ray._private.worker as worker

        node = worker._global_node
        processes = {name: node.all_processes[kind][0].process
                     for name, kind in (("GCS", rc.PROCESS_TYPE_GCS_SERVER), ("raylet", rc.PROCESS_TYPE_RAYLET))}
    except Exception:  # noqa: BLE001 -- Ray's internals moved, or nothing was started here: no watch
        return None

    def connected() -> bool:
        return worker._global_node is node and worker.global_worker.connected

    def run() -> None:
        from devices.reaper import farewell

        while connected():  # until shut down (or restarted: a new Ray gets its own watch)
            time.sleep(POLL_S)
            line = check(processes, connected)
            if line is not None:
                _lost.append(line)
                print(line, file=sys.stderr, flush=True)
                farewell()  # fleetsim has said why: the reaper adds no line if Ray now ends the process
                _interrupt_run()
                return

    thread = threading.Thread(target=run, name="fleetsim-ray-watch", daemon=True)
    thread.start()
    return thread
