"""The host pool: a few Ray actors (one per CPU by default), each holding a shard of devices.

Never one actor per device: each actor is a process. Devices are spread over hosts by
expected work (their number of interactions) so hosts finish a round together. The pool
can also run its hosts in-process (``use_ray=False``), which tests and Flower's own
engine use.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from devices.data import Interactions, Timeline
from devices.errors import FleetsimError
from devices.host import DeviceHost, JobResult, Shard
from devices.models import ModelSpec
from devices.recovery import Recovery, hush_worker_death_notes, placement
from devices.runtime import DeviceSettings

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
# Ray 2.55 warns on every start about a future change of GPU env handling (no GPU is used):
# set here, where Ray is started, so every user of the pool (CLI, benchmarks, tests) is quiet
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def assign_hosts(work: np.ndarray, n_hosts: int) -> np.ndarray:
    """Host of every device: devices sorted by work dealt in a snake order (0,1,..,n-1,
    n-1,..,0, ...) so each host gets a near-equal share of heavy and light devices."""
    order = np.argsort(-np.asarray(work), kind="stable")
    k = np.arange(len(order)) % (2 * n_hosts)
    lane = np.where(k < n_hosts, k, 2 * n_hosts - 1 - k)
    host = np.empty(len(order), dtype=np.int64)
    host[order] = lane
    return host


def shard_of(inter: Interactions, timeline: Timeline, ids: np.ndarray, evaluated: np.ndarray | None = None) -> Shard:
    """The sub-stream of devices ``ids`` (ascending) as a shard with local users 0..n-1;
    ``evaluated`` (a mask over all devices, None = all) says which of them are scored."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    counts = inter.counts[ids]
    indptr = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    # rows of every selected user, vectorised: start of its run + offset within the run
    rows = np.repeat(inter.indptr[ids] - indptr[:-1], counts) + np.arange(indptr[-1])
    sub = Interactions(len(ids), inter.n_items, indptr, inter.items[rows], inter.times[rows])
    return Shard(ids, sub, timeline, None if evaluated is None else np.asarray(evaluated, dtype=bool)[ids])


class RayUnreachable(ConnectionError):
    """``--ray-address`` names no Ray cluster that answers."""


class RayStartError(FleetsimError):
    """The embedded Ray did not start (an unwritable or full temp folder, a file-size
    limit, no free port ...): one line, exit 2. Ray may still hold threads, so the CLI
    ends the process at once after the line."""

    hard_exit = True


RAY_CONNECT_TIMEOUT_S = 20.0
# An embedded Ray that has not started in this long never will: under a process-count
# limit (a cgroup's pids.max, ulimit -u) its core worker waits for a raylet that cannot
# start its threads, without a message and holding the GIL (devices.reaper.watchdog ends
# it). A normal start takes 3-15 s, 40 s on a loaded machine.
RAY_START_TIMEOUT_S = 180.0
# Host processes that have not answered in this long (plus HOST_START_S_PER_HOST each:
# 64 hosts importing torch on 2 cores take minutes) never will: under the same limits Ray
# starts its GCS and raylet but no worker, and waits for one without a message. After
# HOST_START_NOTE_S the user is told what is being waited for.
HOST_START_TIMEOUT_S = 240.0
HOST_START_S_PER_HOST = 5.0
HOST_START_NOTE_S = 60.0
_WHY_NOTHING = ("Ray names no cause: its processes may be unable to start threads (a process-count limit: "
                "ulimit -u, a container's or cgroup's pids.max), or the machine is overloaded")


def _check_reachable(address: str, timeout: float) -> None:
    """A TCP connection to ``host:port`` (Ray's GCS) within ``timeout``, or ``RayUnreachable``."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnreachable(f"--ray-address {address}: expected host:port (or 'auto')")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise RayUnreachable(f"--ray-address {address}: no Ray cluster answers there "
                             f"({exc.strerror or type(exc).__name__})") from None


def init_ray(address: str | None, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Start an embedded Ray (default) or join an existing cluster at ``address``.

    Joining fails with ``RayUnreachable`` within about ``timeout`` seconds: the GCS port
    must accept a TCP connection, and ``ray.init`` must return in time (it is run in a
    helper thread because it can retry for minutes). An embedded Ray is watched by the
    reaper (``devices.reaper``), so its processes die with the driver, even on kill -9; a
    joined one by the reaper too, which then only says when the driver ended abruptly.
    """
    import ray

    if ray.is_initialized():
        return
    t0 = time.monotonic()
    if address and address != "auto":
        _check_reachable(address, timeout / 2)
    from devices.reaper import start_reaper

    # embedded: Ray's processes die with the driver, even on kill -9; joined: none is the driver's to stop, but
    # a driver that Ray ends (60 s after it loses the head's GCS, with exit status 1) or that is killed is still
    # said in one line
    start_reaper()
    kwargs = dict(
        # "local" never joins a stale cluster left in Ray's temp folder (Ray would otherwise join it).
        address=address or "local",
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        # Hosts import device functions by module: give them the driver's import path
        # (user strategies living next to the experiment included).
        runtime_env={"env_vars": {"FLWR_TELEMETRY_ENABLED": "0",
                                  "PYTHONPATH": os.pathsep.join([os.getcwd(), *filter(None, [os.environ.get("PYTHONPATH")])])}},
    )
    if not address:
        from devices.reaper import watchdog

        try:
            # a start that blocks holds the GIL (see RAY_START_TIMEOUT_S): only the reaper can end it
            with watchdog(RAY_START_TIMEOUT_S, f"fleetsim: error: Ray's start did not finish within "
                                               f"{RAY_START_TIMEOUT_S:.0f} s, and {_WHY_NOTHING}; the run is "
                                               f"stopped (Ray held the driver's Python, so it is killed)"):
                ray.init(**kwargs)
        except Exception as exc:  # noqa: BLE001 -- the machine's, not the run's: one line
            first = (str(exc).splitlines() or [type(exc).__name__])[0][:300]
            where = os.environ.get("RAY_TMPDIR") or os.environ.get("TMPDIR") or "/tmp"
            raise RayStartError(f"cannot start Ray ({type(exc).__name__}: {first}); Ray needs a writable folder with "
                                f"free space in {where} (RAY_TMPDIR, else TMPDIR, else /tmp) and no file-size limit "
                                f"(ulimit -f)") from None
        from devices.raywatch import watch_core_processes

        watch_core_processes()  # a GCS or raylet that dies is said at once (Ray would end the run without a word)
        return
    outcome: list[BaseException | None] = []

    def connect() -> None:
        try:
            ray.init(**kwargs)
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 -- handed to the caller's thread
            outcome.append(exc)

    # Ray and its C++ core write warnings straight to fd 2 while they retry (a port that is
    # open but is not Ray gives a few; a proxied address dozens): hold them back, and
    # replay them only if the connection succeeds.
    sys.stderr.flush()
    saved, held = os.dup(2), tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)
    try:
        thread = threading.Thread(target=connect, name="ray-connect", daemon=True)
        thread.start()
        thread.join(max(timeout - (time.monotonic() - t0), 1.0))
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
    if outcome and outcome[0] is None:
        held.seek(0)
        noise = ("SIGTERM handler is not set", "Connecting to existing Ray cluster")
        text = "".join(line for line in held.read().decode(errors="replace").splitlines(keepends=True)
                       if not any(n in line for n in noise))
        if text.strip():
            sys.stderr.write(text)
    held.close()
    if not outcome:
        raise RayUnreachable(f"--ray-address {address}: no Ray cluster answered within {timeout:.0f} s")
    if outcome[0] is not None:
        first = (str(outcome[0]).splitlines() or [type(outcome[0]).__name__])[0]
        raise RayUnreachable(f"--ray-address {address}: could not join the Ray cluster ({first})")


def cluster_hosts(n_hosts: int) -> int:
    """``n_hosts``, or one host per CPU of the (started) Ray cluster for 0."""
    import ray

    return n_hosts if n_hosts > 0 else max(1, int(ray.available_resources().get("CPU", 1)))


def oversubscribed(n_hosts: int, cpus: float) -> str | None:
    """A warning when a pool has more host processes than the cluster has CPUs, else None.
    Each host is a process (about 0.3 GB with torch): beyond one per CPU they only take
    turns on the cores (a drill: 64 hosts on 2 CPUs, 18 GB and 10x the wall time)."""
    if n_hosts <= max(1, int(cpus)):
        return None
    return (f"fleetsim: warning: {n_hosts} device hosts on a Ray cluster of {int(cpus)} CPUs: each host is a process "
            f"(about 0.3 GB) and they take turns on the cores, which is slower and may exhaust memory; "
            f"experiment.hosts = 0 (or --hosts 0) starts one per CPU")


def host_actor() -> Any:
    """``DeviceHost`` as a Ray actor class; a host takes no CPU from Ray's accounting (one
    host per CPU is the pool's own rule)."""
    import ray

    return ray.remote(num_cpus=0)(DeviceHost)


class _NotMainThread(logging.Filter):
    """Drops Ray's note that ``ray.init`` outside the main thread sets no SIGTERM handler
    (the run sets its own: ``simulator.run``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


_NOT_MAIN_THREAD = _NotMainThread()  # one instance: adding it again is a no-op


class HostProcesses:
    """Ray and the hosts' processes, started in a background thread before the fleet exists.

    A host's process takes seconds to come up, nearly all of them outside the driver:
    Ray's own start (its GCS and raylet), then the host process importing torch. Begun
    before the fleet is built, they run beside the build, whose single-threaded parts
    leave a core idle. ``HostPool(..., processes=...)`` then gives each started host its
    shard (``DeviceHost.load``). No more hosts are started than ``max_hosts`` (the fleet's
    devices, when known): a host without a device would only be stopped again.

    Args:
        n_hosts: host count (0: one per CPU of the cluster).
        ray_address: the cluster to join (None: an embedded Ray, started here).
        max_hosts: at most this many hosts (None: no bound but ``n_hosts``).
    """

    def __init__(self, n_hosts: int = 0, ray_address: str | None = None, max_hosts: int | None = None) -> None:
        self.n_hosts, self.ray_address, self.max_hosts = n_hosts, ray_address, max_hosts
        self.actors: list[Any] = []
        self.node_of: list[str | None] = []
        self._error: BaseException | None = None
        self._taken = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._start, name="fleetsim-host-processes", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        try:
            logging.getLogger("ray._private.worker").addFilter(_NOT_MAIN_THREAD)
            init_ray(self.ray_address)
            actor = host_actor()
            n = cluster_hosts(self.n_hosts)
            for h in range(n if self.max_hosts is None else max(1, min(n, self.max_hosts))):
                self.actors.append(actor.options(scheduling_strategy=placement(h, self.node_of)).remote(None))
        except BaseException as exc:  # noqa: BLE001 -- raised in the caller's thread by take()
            self._error = exc
        finally:
            self._done.set()
        # Ray starts its processes with PR_SET_PDEATHSIG, which fires when the *thread* that
        # forked them ends: this thread stays (parked, a daemon) as long as the driver.
        threading.Event().wait()

    def take(self) -> tuple[list[Any], list[str | None]]:
        """The started actors and their nodes (waits for the start; raises what it raised)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        self._taken = True
        return self.actors, self.node_of

    def close(self, wait_s: float = 10.0) -> None:
        """Stop the started actors unless a pool took them (a run that ended before its pool).

        A start still under way after ``wait_s`` is left to the process's end (Ray's
        processes die with the driver, ``devices.reaper``): a SIGTERM sent to the whole
        process group also kills Ray's GCS, and Ray's start would then wait 60 s for it."""
        if not self._done.wait(wait_s):
            return
        if self._taken or not self.actors:
            return
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


class HostPool(Recovery):
    """Routes device work to the host holding each device.

    Under Ray a host process that dies is recovered (``_recover``): a new actor for its
    shard gets the *restore point* (the last ``reset``, a ``set_restore_point`` or
    ``load_states``), replays the state-changing calls sent to that host since then (the
    replay log), and is sent the call that failed; the other hosts' results are kept.
    Device work is deterministic, so the run's numbers equal an uninterrupted run's.
    """

    def __init__(
        self,
        inter: Interactions,
        timeline: Timeline,
        spec: ModelSpec,
        settings: DeviceSettings,
        seed: int,
        n_hosts: int = 0,
        use_ray: bool = True,
        ray_address: str | None = None,
        log: Callable[[str], None] | None = None,
        evaluated: np.ndarray | None = None,
        processes: HostProcesses | None = None,
    ) -> None:
        """``processes``: hosts started beforehand (Ray only); they set the host count."""
        self.use_ray = use_ray
        self.in_flight: str | None = None  # what the hosts are doing now (``_call``), for a stall note
        self.spec = spec  # the devices' model: FleetGrid checks what a strategy sends against its shapes
        self.log = log or _stderr
        started: list[Any] = []
        if use_ray and processes is not None:
            started, node_of = processes.take()
            n_hosts = len(started)
        elif use_ray:
            init_ray(ray_address)
            n_hosts = cluster_hosts(n_hosts)
        n_hosts = max(1, min(n_hosts if n_hosts > 0 else 1, inter.n_users))
        self.n_hosts = n_hosts
        self.host_of = assign_hosts(inter.counts, n_hosts)
        self.n_devices = inter.n_users
        self.restarts = 0  # host processes restarted over the pool's life
        self._round_restarts: dict[int, int] = {}  # per round of the current strategy (0: between rounds)
        self._deaths: dict[tuple[int, int], int] = {}  # (host, round) -> deaths
        self._restore: Any = None  # None (as built), ("reset", initial), list of states, or a folder
        self._log: list[list[tuple[str, tuple]]] = [[] for _ in range(n_hosts)]
        shards = [shard_of(inter, timeline, np.flatnonzero(self.host_of == h), evaluated) for h in range(n_hosts)]
        if use_ray:
            import ray

            hush_worker_death_notes()
            self._actor = host_actor()
            self._shards = [ray.put(s) for s in shards]  # kept: a replacement is built from them
            self._args = (spec, settings, seed, True)  # own processes: prefetch the next window's scores
            self._node_of: list[str | None] = []
            if not started:
                self.hosts = [self._new_actor(h) for h in range(n_hosts)]
                self._await_hosts([h.pid.remote() for h in self.hosts])
            else:
                for extra in started[n_hosts:]:  # a fleet smaller than the hosts started
                    ray.kill(extra)
                self.hosts, self._node_of = started[:n_hosts], node_of[:n_hosts]
                self._await_hosts([h.pid.remote() for h in self.hosts])
                self._call("load", [(self._shards[h], *self._args) for h in range(n_hosts)])
        else:
            self.hosts = [DeviceHost(s, spec, settings, seed) for s in shards]

    def _await_hosts(self, answers: list[Any]) -> None:
        """Wait for every host process's first answer (``answers``: one call's futures per
        host), for at most ``HOST_START_TIMEOUT_S`` + ``HOST_START_S_PER_HOST`` a host:
        one note after ``HOST_START_NOTE_S``, then ``RayStartError``. A host that died
        answers with its error, raised by the pool's next call as usual."""
        import ray

        limit = HOST_START_TIMEOUT_S + HOST_START_S_PER_HOST * len(answers)
        _, pending = ray.wait(answers, num_returns=len(answers), timeout=min(HOST_START_NOTE_S, limit))
        if pending:
            self.log(f"fleetsim: {len(answers) - len(pending)} of {len(answers)} device hosts have started after "
                     f"{HOST_START_NOTE_S:.0f} s; waiting up to {limit:.0f} s in all")
            _, pending = ray.wait(answers, num_returns=len(answers), timeout=max(limit - HOST_START_NOTE_S, 0.0))
        if pending:
            for h in self.hosts:
                ray.kill(h)
            raise RayStartError(f"{len(pending)} of {len(answers)} device host processes did not start within "
                                f"{limit:.0f} s, and {_WHY_NOTHING}")

    def _call(self, method: str, args_per_host: list[tuple | None], round: int = 0, logged: bool = False,
              what: str | None = None) -> list[Any]:
        """``method`` on every host with arguments (None: not that host); ``logged``: it
        changes the device state, so it enters each host's replay log once it succeeded.
        While it runs, ``in_flight`` says what the hosts do (``what``, else the method)."""
        self.in_flight = what or f"the hosts' {method}"
        try:
            return self._call_hosts(method, args_per_host, round, logged)
        finally:
            self.in_flight = None

    def _call_hosts(self, method: str, args_per_host: list[tuple | None], round: int, logged: bool) -> list[Any]:
        if not self.use_ray:
            return [getattr(h, method)(*a) if a is not None else None for h, a in zip(self.hosts, args_per_host)]
        import ray

        futures = {h: getattr(self.hosts[h], method).remote(*a) for h, a in enumerate(args_per_host) if a is not None}
        out: list[Any] = [None] * self.n_hosts
        for h, future in futures.items():
            try:
                out[h] = ray.get(future)
            except Exception as exc:
                if not self.lost_host(exc):
                    raise
                out[h] = self._recover(h, method, args_per_host[h], round, exc)
            if logged:
                self._log[h].append((method, args_per_host[h]))
        return out

    def _new_restore_point(self, source: Any) -> None:
        self._restore = source
        self._log = [[] for _ in range(self.n_hosts)]

    def reset(self, initial: dict[str, np.ndarray]) -> None:
        """Every device holds ``initial``; this is the new restore point, and the
        per-round restart counts start over (a new strategy)."""
        between = self._round_restarts.get(0, 0)  # not in a record yet: the next round's counts them
        self._round_restarts.clear()
        if between:
            self._round_restarts[0] = between
        self._deaths.clear()
        if self.use_ray:
            import ray

            initial = ray.put(initial)  # shipped once, shared by all hosts
        self._new_restore_point(("reset", initial))
        self._call("reset", [(initial,)] * self.n_hosts)

    def score(self, round: int) -> list[dict[str, Any]]:
        return self._call("score", [(round,)] * self.n_hosts, round=round, logged=True)

    def run(self, round: int, exchange: int, jobs_per_host: list[list]) -> list[JobResult]:
        """Run the jobs of each host (one call per host); results of all hosts, flattened."""
        fns = sorted({getattr(job[0], "__name__", str(job[0])) for jobs in jobs_per_host for job in jobs or ()})
        if self.use_ray:
            import ray

            # in the object store: the replay log keeps them as sent, whatever the caller does next
            jobs_per_host = [ray.put(jobs) if jobs else jobs for jobs in jobs_per_host]
        args = [(round, exchange, jobs) if jobs else None for jobs in jobs_per_host]
        out: list[JobResult] = []
        for res in self._call("run", args, round=round, logged=True, what=f"device function {', '.join(fns)}"):
            if res:
                out.extend(res)
        return out

    def states(self) -> list[bytes]:
        """Every host's device state (``DeviceHost.get_state``), one call per host."""
        return self._call("get_state", [()] * self.n_hosts)

    def set_restore_point(self, source: list[bytes] | Path) -> None:
        """Where a restarted host starts from: ``states()`` kept in memory, or a folder with
        ``host-000.pkl``, ``host-001.pkl``, ... (read only when a host is restored). The
        replay log starts over."""
        if isinstance(source, (str, Path)):
            source = Path(source)
        elif len(source) != self.n_hosts or not all(isinstance(s, bytes) for s in source):
            raise ValueError(f"a restore point needs {self.n_hosts} host states (bytes), got {len(source)}")
        else:
            source = list(source)
        self._new_restore_point(source)

    def load_states(self, folder: Path) -> None:
        """Every host's state from ``folder``'s ``host-NNN.pkl`` (a run resuming from a
        checkpoint); the folder becomes the restore point."""
        folder = Path(folder)
        data = [(folder / f"host-{h:03d}.pkl").read_bytes() for h in range(self.n_hosts)]
        self._new_restore_point(folder)
        self._call("set_state", [(d,) for d in data])

    def lost_host(self, exc: BaseException) -> bool:
        """Whether ``exc`` says a host process died (not a Python error inside a host)."""
        if not self.use_ray:
            return False
        import ray.exceptions as rex

        return isinstance(exc, rex.RayError) and not isinstance(exc, rex.RayTaskError)

    def memory_bytes(self) -> int:
        return int(sum(self._call("memory_bytes", [()] * self.n_hosts)))

    def shutdown(self) -> None:
        if self.use_ray:
            import ray

            for h in self.hosts:
                ray.kill(h)
        self.hosts = []
