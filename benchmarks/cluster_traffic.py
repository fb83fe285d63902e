"""What moves between the driver and each device host per round, on a 2-node Ray cluster.

    python benchmarks/cluster_traffic.py [--devices 2000] [--rounds 3] [--strategies fedavg,duet]

Starts a two-node cluster (``ray.cluster_utils.Cluster``, one CPU per node, so one host per
node), runs the strategies on it as ``fleetsim run --ray-address`` would, and counts the
serialised bytes of every call to a host: its arguments (driver -> host: the jobs of the
exchange, the model versions they name, a strategy's reset) and its result (host -> driver:
the replies and the scoring records). The model a reset installs is put in Ray's object
store once and counted once per host. A checkpoint (every round by default) brings each
host's device state to the driver. Prints, per strategy, the median bytes per host and
round each way, per checkpoint, and the whole run's bytes per host.
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import statistics
import tempfile
from collections import defaultdict

os.environ["FLWR_TELEMETRY_ENABLED"] = "0"


def _size(obj) -> int:
    import ray

    if isinstance(obj, ray.ObjectRef):
        obj = ray.get(obj)
    if isinstance(obj, (list, tuple)):
        return sum(_size(o) for o in obj)
    return len(pickle.dumps(obj, protocol=5))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--strategies", default="fedavg,local_finetune,duet,metapatch,momodistill")
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from devices.pool import HostPool
    from simulator import config
    from simulator.errors import FleetsimError
    from simulator.run import run_experiment

    logging.getLogger("flwr").setLevel(logging.WARNING)
    names = args.strategies.split(",")
    try:
        cfg = config.from_dict({"experiment": {"strategies": names, "hosts": 0},
                                "data": {"n_devices": args.devices, "n_rounds": args.rounds}, "cloud": {"epochs": 1}})
    except FleetsimError as exc:
        ap.exit(2, f"cluster_traffic: {exc}\n")
    traffic: dict[tuple[str, int, str], list[int]] = defaultdict(lambda: [0, 0])  # (strategy, host, round) -> [down, up]
    current = {"strategy": names[0]}
    original = HostPool._call
    checkpoints = [0]

    def counted(self, method, args_per_host, round=0, logged=False):
        out = original(self, method, args_per_host, round=round, logged=logged)
        if method == "get_state":
            checkpoints[0] += 1
        key = {"reset": "reset", "get_state": f"checkpoint {checkpoints[0]}"}.get(method, str(round))
        for h, a in enumerate(args_per_host):
            if a is not None:
                t = traffic[(current["strategy"], h, key)]
                t[0] += _size(list(a))
                t[1] += _size(out[h])
        return out

    original_reset = HostPool.reset
    resets = [0]

    def reset(self, initial):  # every strategy starts with a reset of the pool
        current["strategy"] = names[min(resets[0], len(names) - 1)]
        resets[0] += 1
        return original_reset(self, initial)

    HostPool._call, HostPool.reset = counted, reset
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    try:
        with tempfile.TemporaryDirectory() as out:
            run_experiment(cfg, os.path.join(out, "run"), ray_address=cluster.address, progress=False,
                           log=lambda *_: None)
            nodes = len({n["NodeID"] for n in ray.nodes() if n["Alive"]})
    finally:
        ray.shutdown()
        cluster.shutdown()
        HostPool._call, HostPool.reset = original, original_reset
    print(f"{args.devices} devices, {args.rounds} rounds, {nodes} nodes, one host each; bytes per host")
    print(f"{'strategy':<14} {'reset down':>11} {'round down (median)':>20} {'round up (median)':>18} "
          f"{'checkpoint up':>14} {'run total':>11}")
    for name in names:
        rows = {(h, r): v for (s, h, r), v in traffic.items() if s == name}
        hosts = sorted({h for h, _ in rows})
        reset_down = statistics.median(rows.get((h, "reset"), [0, 0])[0] for h in hosts)
        per_round = [v for (h, r), v in rows.items() if r != "reset" and not r.startswith("checkpoint")]
        ckpt = [v[1] for (h, r), v in rows.items() if r.startswith("checkpoint")]
        down = statistics.median(v[0] for v in per_round)
        up = statistics.median(v[1] for v in per_round)
        total = statistics.median(sum(sum(v) for (hh, _), v in rows.items() if hh == h) for h in hosts)
        print(f"{name:<14} {reset_down / 1e6:9.2f} MB {down / 1e6:17.2f} MB {up / 1e6:15.2f} MB "
              f"{statistics.median(ckpt) / 1e6 if ckpt else 0:11.2f} MB {total / 1e6:8.2f} MB")


if __name__ == "__main__":
    main()
