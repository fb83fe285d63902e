"""The reaper: no process a run started outlives its driver, even after ``kill -9``.

An embedded Ray (``ray.init(address="local")``) starts a dozen processes under the driver:
GCS, raylet, dashboard and runtime-env agents, one worker per host actor. When the
driver is killed with SIGKILL nothing in it runs, and some of these (the two agents)
ignore SIGTERM and stay alive.

``start_reaper()`` launches this file as a small stand-alone process (stdlib only, its
own session so Ctrl-C in the terminal does not reach it). It holds the read end of a
pipe whose only write end is the driver's, and every ``POLL_S`` seconds records the
driver's descendants from ``/proc`` (pid and start time, so a reused pid is never
hit). When the pipe reaches end-of-file the driver is gone, however it died: the
reaper SIGKILLs every recorded process still alive and exits. On a normal exit Ray has
already stopped its processes and there is nothing left to kill.

It is also the run's watchdog for calls that can block the driver's whole Python:
``watchdog(seconds, line)`` arms it around such a call (Ray's start holds the GIL while
its core worker waits for a raylet that cannot start its threads, so no thread, signal
handler or Ctrl-C of the driver runs). If the call has not returned in time, the reaper
writes ``line`` to the driver's stderr, SIGKILLs the driver (exit status 137: nothing
else can end it) and then the driver's processes, as above.

And it says when a run's driver ended abruptly. While a run is open (``run_folder``, from
``FleetRun.open`` to ``FleetRun.close``), every way fleetsim ends the process itself (a
return, an error's line or traceback, a signal's line) first tells the reaper ``bye``
(``farewell``: at exit, in the CLI before ``os._exit``, when the run closes). A driver
that ends without it was killed (``kill -9``, the OOM killer), crashed in native code, or
was ended by Ray's core worker (which ends its process when it loses its raylet or GCS):
the reaper then writes one line to the stderr it shares with the driver, naming the run's
folder and ``--resume``.

Linux only (``/proc``); elsewhere ``start_reaper``, ``watchdog`` and the rest do nothing.
"""
from __future__ import annotations

import atexit
import os
import select
import shlex
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

POLL_S = 0.5


def proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state letter, parent pid, start time in clock ticks) of a process from
    ``/proc/<pid>/stat``, or None if it does not exist (or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in () may hold spaces
        return fields[0], int(fields[1]), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process in /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := proc_stat(int(entry))) is not None:
            out[int(entry)] = (st[1], st[2])
    return out


def descendants(root: int) -> dict[int, int]:
    """Every process below ``root``: pid -> start time."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found, stack = {}, [root]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in found:
                found[child] = table[child][1]
                stack.append(child)
    return found


def _kill(recorded: dict[int, int]) -> None:
    table = _process_table()
    for pid, start in recorded.items():
        if pid != os.getpid() and pid in table and table[pid][1] == start:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def resume_hint(folder: str | None = None) -> str:
    """What a user with an interrupted run is told; ``folder`` defaults to the open run's."""
    folder = _folder if folder is None else folder
    how = f"`fleetsim run --resume {folder}`" if folder else "`fleetsim run --resume` with the run's folder"
    return f"rounds already written are kept, and {how} continues it"


def abrupt_end(driver: int, folder: str) -> str:
    """The line for a driver that ended while its run in ``folder`` was open, without ``bye``."""
    return (f"fleetsim: error: the run's process (pid {driver}) ended abruptly: killed (kill -9, the out-of-memory "
            f"killer), crashed, or ended by Ray after losing its raylet or GCS; {resume_hint(folder)}")


def watch(driver: int) -> None:
    """Record ``driver``'s descendants until stdin closes, then kill those still alive.
    Lines on stdin arm (``arm SECONDS LINE``) and disarm (``disarm``) the watchdog, open a
    run (``folder PATH``, shell-quoted) and announce fleetsim's own word (``bye``)."""
    recorded: dict[int, int] = {}
    pending, deadline, line = b"", None, ""
    folder = ""  # the open run's; "" once fleetsim has had its word (or no run is open)
    while True:
        recorded.update(descendants(driver))
        ready, _, _ = select.select([sys.stdin], [], [], POLL_S)
        if ready:
            data = os.read(sys.stdin.fileno(), 4096)
            if not data:
                break
            *commands, pending = (pending + data).split(b"\n")
            for command in commands:
                word, _, rest = command.decode(errors="replace").partition(" ")
                if word == "arm":
                    seconds, _, line = rest.partition(" ")
                    deadline = time.monotonic() + float(seconds)
                elif word == "disarm":
                    deadline = None
                elif word == "folder":
                    folder = rest
                elif word == "bye":
                    folder = ""
        if deadline is not None and time.monotonic() > deadline:
            _say(line)
            folder = ""
            if proc_stat(driver) is not None:
                os.kill(driver, signal.SIGKILL)
            break
    if folder:
        _say(abrupt_end(driver, folder))
    # the driver's stderr: whoever reads it to its end (a pipe) need not wait for the kills
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    time.sleep(POLL_S)  # let a normal shutdown finish first
    _kill(recorded)


def _say(line: str) -> None:
    """One line on the stderr the reaper shares with the driver."""
    try:
        os.write(2, (line + "\n").encode(errors="replace"))
    except OSError:  # a closed terminal, a full disk: nothing else to tell it with
        pass


@contextmanager
def watchdog(seconds: float, line: str):
    """Within this block the driver is ended after ``seconds`` (``line`` on its stderr,
    then SIGKILL) unless the block has finished: for a call that may block the whole
    interpreter. No-op without a reaper (``start_reaper``)."""
    armed = _tell(f"arm {seconds} {' '.join(line.split())}")
    try:
        yield
    finally:
        if armed:
            _tell("disarm")


def farewell() -> None:
    """fleetsim has had its word (or the run closed): the reaper says nothing if this
    process ends now. Called when a run closes, before every ``os._exit`` of the CLI, and
    at exit (``start_reaper``)."""
    global _folder
    _folder = ""
    _tell("bye")


def run_folder(path: str) -> None:
    """A run is open in ``path``: named, with ``--resume``, in the reaper's line if this
    process ends abruptly before ``farewell``."""
    global _folder
    _folder = shlex.quote(" ".join(str(path).splitlines()))
    _tell(f"folder {_folder}")


def _tell(command: str) -> bool:
    """One command line to the running reaper (its pipe is the last one made); False if
    there is none (or it is gone)."""
    if not _pipes or _reaper is None or _reaper.poll() is not None:
        return False
    try:
        os.write(_pipes[-1], f"{command}\n".encode())
    except OSError:  # it ended between the check and the write
        return False
    return True


def start_reaper() -> subprocess.Popen | None:
    """Start the reaper for this process (once); returns it, or None where /proc is missing."""
    global _reaper
    if _reaper is not None and _reaper.poll() is None:
        return _reaper
    if not os.path.isdir("/proc/self"):
        return None
    read, write = os.pipe()  # both ends non-inheritable: only the reaper gets the read end
    # stderr: the driver's own, for its lines (closed as soon as the driver is gone)
    _reaper = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid())], stdin=read,
                               stdout=subprocess.DEVNULL, start_new_session=True, close_fds=True)
    os.close(read)
    _pipes.append(write)  # kept open for the life of this process; written by watchdog()
    if _folder:
        _tell(f"folder {_folder}")
    if not _farewell_at_exit:
        atexit.register(farewell)  # a normal exit, a traceback's too: fleetsim's word was said
        _farewell_at_exit.append(True)
    return _reaper


_reaper: subprocess.Popen | None = None
_pipes: list[int] = []
_folder = ""
_farewell_at_exit: list[bool] = []

if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    watch(int(sys.argv[1]))
