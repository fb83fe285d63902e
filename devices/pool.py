"""The host pool: a few Ray actors (one per CPU by default), each holding a shard of devices.

Never one actor per device: each actor is a process. Devices are spread over hosts by
expected work (their number of interactions) so hosts finish a round together. The pool
can also run its hosts in-process (``use_ray=False``), which tests and Flower's own
engine use.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from devices.data import Interactions, Timeline
from devices.host import DeviceHost, JobResult, Shard
from devices.models import ModelSpec
from devices.runtime import DeviceSettings

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")


def assign_hosts(work: np.ndarray, n_hosts: int) -> np.ndarray:
    """Host of every device: devices sorted by work dealt in a snake order (0,1,..,n-1,
    n-1,..,0, ...) so each host gets a near-equal share of heavy and light devices."""
    order = np.argsort(-np.asarray(work), kind="stable")
    k = np.arange(len(order)) % (2 * n_hosts)
    lane = np.where(k < n_hosts, k, 2 * n_hosts - 1 - k)
    host = np.empty(len(order), dtype=np.int64)
    host[order] = lane
    return host


def shard_of(inter: Interactions, timeline: Timeline, ids: np.ndarray) -> Shard:
    """The sub-stream of devices ``ids`` (ascending) as a shard with local users 0..n-1."""
    ids = np.sort(np.asarray(ids, dtype=np.int64))
    counts = inter.counts[ids]
    indptr = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(counts, out=indptr[1:])
    # rows of every selected user, vectorised: start of its run + offset within the run
    rows = np.repeat(inter.indptr[ids] - indptr[:-1], counts) + np.arange(indptr[-1])
    sub = Interactions(len(ids), inter.n_items, indptr, inter.items[rows], inter.times[rows])
    return Shard(ids, sub, timeline)


def init_ray(address: str | None) -> None:
    """Start an embedded Ray (default) or join an existing cluster at ``address``."""
    import ray

    if ray.is_initialized():
        return
    # "local" never joins a stale cluster left in Ray's temp folder (FLOWER-NOTES.md).
    ray.init(
        address=address or "local",
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        # Hosts import device functions by module: give them the driver's import path
        # (user strategies living next to the experiment included).
        runtime_env={"env_vars": {"FLWR_TELEMETRY_ENABLED": "0",
                                  "PYTHONPATH": os.pathsep.join([os.getcwd(), *filter(None, [os.environ.get("PYTHONPATH")])])}},
    )


class HostPool:
    """Routes device work to the host holding each device."""

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
    ) -> None:
        self.use_ray = use_ray
        if use_ray:
            import ray

            init_ray(ray_address)
            if n_hosts <= 0:
                n_hosts = max(1, int(ray.available_resources().get("CPU", 1)))
        n_hosts = max(1, min(n_hosts if n_hosts > 0 else 1, inter.n_users))
        self.n_hosts = n_hosts
        self.host_of = assign_hosts(inter.counts, n_hosts)
        self.n_devices = inter.n_users
        shards = [shard_of(inter, timeline, np.flatnonzero(self.host_of == h)) for h in range(n_hosts)]
        if use_ray:
            import ray

            actor = ray.remote(num_cpus=0)(DeviceHost)
            refs = [ray.put(s) for s in shards]
            self.hosts = [actor.remote(r, spec, settings, seed) for r in refs]
        else:
            self.hosts = [DeviceHost(s, spec, settings, seed) for s in shards]

    def _call(self, method: str, args_per_host: list[tuple]) -> list[Any]:
        if self.use_ray:
            import ray

            futures = [getattr(h, method).remote(*a) for h, a in zip(self.hosts, args_per_host) if a is not None]
            results = iter(ray.get(futures))
            return [next(results) if a is not None else None for a in args_per_host]
        return [getattr(h, method)(*a) if a is not None else None for h, a in zip(self.hosts, args_per_host)]

    def reset(self, initial: dict[str, np.ndarray]) -> None:
        if self.use_ray:
            import ray

            ref = ray.put(initial)  # shipped once, shared by all hosts
            self._call("reset", [(ref,)] * self.n_hosts)
        else:
            self._call("reset", [(initial,)] * self.n_hosts)

    def score(self, round: int) -> list[dict[str, Any]]:
        return self._call("score", [(round,)] * self.n_hosts)

    def run(self, round: int, exchange: int, jobs_per_host: list[list]) -> list[JobResult]:
        """Run the jobs of each host (one call per host); results of all hosts, flattened."""
        args = [(round, exchange, jobs) if jobs else None for jobs in jobs_per_host]
        out: list[JobResult] = []
        for res in self._call("run", args):
            if res:
                out.extend(res)
        return out

    def memory_bytes(self) -> int:
        return int(sum(self._call("memory_bytes", [()] * self.n_hosts)))

    def shutdown(self) -> None:
        if self.use_ray:
            import ray

            for h in self.hosts:
                ray.kill(h)
        self.hosts = []
