"""Recovery of lost device hosts (Ray only), mixed into ``devices.pool.HostPool``.

A host process that dies (SIGKILL, segfault, OOM kill, its node gone) is replaced by a
new actor built from the same shard; it gets the pool's restore point (the last reset,
a set of saved host states in memory or in a folder) and replays the state-changing
calls sent to that host since then, then the call that failed is sent to it again.
Device work is deterministic given the device state and the call, so the replacement
ends up exactly where the dead host was. A host that dies ``MAX_DEATHS`` times within
one round raises ``HostLost``.
"""
from __future__ import annotations

from typing import Any

from devices.errors import HostLost

MAX_DEATHS = 3  # a host that dies this often within one round raises HostLost
WORKER_DIED_NOTE = "A worker died or was killed while executing a task"


def hush_worker_death_notes() -> None:
    """Ray's driver prints a note to stdout for every worker process that dies; the pool
    reports each lost host in one line of its own instead, so that note is dropped."""
    from ray._private import worker

    original = getattr(worker, "print_to_stdstream", None)
    if original is None or getattr(original, "fleetsim_filter", False):
        return

    def filtered(data, *args, **kwargs):
        lines = [x for x in data.get("lines", []) if WORKER_DIED_NOTE not in str(x)]
        if lines or not data.get("lines"):
            original({**data, "lines": lines}, *args, **kwargs)

    filtered.fleetsim_filter = True
    worker.print_to_stdstream = filtered


def pick_node(h: int, node_of: list, cpus: dict[str, float]) -> str | None:
    """The node for host ``h``: of the nodes with CPUs, the one where it makes the fewest
    hosts per CPU (a node of 4 CPUs takes twice the hosts of a node of 2), given the nodes
    ``node_of`` the other hosts are on; ties go round the nodes by ``h``. None: no node."""
    nodes = sorted(n for n, c in cpus.items() if c > 0)
    others = [n for j, n in enumerate(node_of) if j != h]
    return min(nodes, key=lambda n: ((others.count(n) + 1) / cpus[n], (nodes.index(n) - h) % len(nodes)), default=None)


def placement(h: int, node_of: list[str | None]) -> Any:
    """The scheduling strategy of host ``h``'s actor: the live node with the fewest hosts
    per CPU (``pick_node``), recorded in ``node_of[h]``; on one node, or if nodes cannot be
    listed, Ray's SPREAD strategy. (SPREAD, and soft node affinity, were both seen to put
    the two hosts of a two-node cluster on one node.) A node that dies before the actor
    starts fails it like a host death."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        cpus = {n["NodeID"]: float(n.get("Resources", {}).get("CPU", 0)) for n in ray.nodes() if n.get("Alive")}
    except Exception:  # noqa: BLE001 -- placement is best effort
        cpus = {}
    node = pick_node(h, node_of, cpus)
    if h < len(node_of):
        node_of[h] = node
    else:
        node_of.append(node)
    if len([n for n, c in cpus.items() if c > 0]) > 1:
        return NodeAffinitySchedulingStrategy(node, soft=False)
    return "SPREAD"


class Recovery:
    """The recovery half of ``HostPool`` (its state is set up by ``HostPool.__init__``)."""

    def _recover(self, h: int, method: str, args: tuple, round: int, exc: BaseException) -> Any:
        """Host ``h`` died during ``method``: replace it, bring it to where it was, and
        return its result of ``method``; ``HostLost`` on its MAX_DEATHS-th death in the round."""
        import ray

        while True:
            deaths = self._deaths[(h, round)] = self._deaths.get((h, round), 0) + 1
            if deaths >= MAX_DEATHS:
                raise HostLost(h, round, deaths, exc) from exc
            where = f"in round {round}" if round else "between rounds"
            try:
                self._replace(h, f"died {where} ({type(exc).__name__})", round)
                return ray.get(getattr(self.hosts[h], method).remote(*args))
            except Exception as again:
                if not self.lost_host(again):
                    raise
                exc = again

    def _replace(self, h: int, why: str, round: int = 0) -> None:
        """A new actor for host ``h``'s shard, restored to the restore point and caught up
        with the replay log (the old actor is killed in case it still runs)."""
        import ray

        try:
            ray.kill(self.hosts[h], no_restart=True)
        except Exception:  # noqa: BLE001 -- it is gone already
            pass
        host = self.hosts[h] = self._new_actor(h)
        self.restarts += 1
        self._round_restarts[round] = self._round_restarts.get(round, 0) + 1
        log = self._log[h]
        self.log(f"fleetsim: warning: device host {h} {why}; restarted it and replayed {len(log)} call(s) "
                 f"from the last restore point")
        src, calls = self._restore, []
        if isinstance(src, tuple):
            calls.append(host.reset.remote(src[1]))
        elif isinstance(src, list):
            calls.append(host.set_state.remote(src[h]))
        elif src is not None:
            calls.append(host.set_state.remote((src / f"host-{h:03d}.pkl").read_bytes()))
        calls += [host.replay.remote(m, *a) for m, a in log]
        ray.get(calls)

    def _new_actor(self, h: int) -> Any:
        """A new actor for host ``h``, built from its shard, placed by ``placement``."""
        return self._actor.options(scheduling_strategy=placement(h, self._node_of)).remote(self._shards[h], *self._args)

    def restarts_in(self, round: int) -> int:
        """Host processes restarted during round ``round`` of the current strategy (0:
        between rounds, not yet taken by ``take_restarts``)."""
        return self._round_restarts.get(round, 0)

    def take_restarts(self, round: int) -> int:
        """The restarts a record of round ``round`` counts: those during the round plus
        those between rounds since the last record (a reset, a checkpoint, a strategy's
        preparation, the gap between two strategies), so every restart is in exactly one
        round's record. Both counts are consumed."""
        return self._round_restarts.pop(round, 0) + (self._round_restarts.pop(0, 0) if round else 0)
