"""FedAvg: Flower's own FedAvg on the server side, plus its device function.

Device half: ``train`` adopts the received global model (the device now predicts with
it), trains a copy of it on its recent data for ``local-steps`` full-batch SGD steps and
uploads the trained weights with its example count, which Flower's FedAvg uses to weight
the average.
"""
from __future__ import annotations

from flwr.app import MessageType
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg

from devices.runtime import DeviceApp, DeviceContext, Payload, evaluate_received, train_held_models
from strategies.base import FleetMixin
from devices.errors import ConfigError
from strategies.common import check_fraction, check_non_negative, weighted_mean_arrays


def train(ctx: DeviceContext, payload: Payload) -> list[Payload]:
    """Adopt the global model, train a copy locally, upload it with the example count."""
    ctx.hold(payload.arrays["arrays"])
    cfg = payload.config()
    new, losses, counts = train_held_models(ctx, int(cfg.get("local-steps", ctx.settings.local_steps)),
                                            float(cfg.get("lr", ctx.settings.lr)))
    arrays = {k: v.numpy() for k, v in new.items()}
    return [
        Payload(arrays={"arrays": {k: v[j] for k, v in arrays.items()}},
                metrics={"metrics": {"num-examples": int(counts[j]), "train_loss": float(losses[j])}})
        for j in range(len(ctx))
    ]


class FedAvg(FleetMixin, FlowerFedAvg, short_name="fedavg", colour="#ff7f0e"):
    """Flower's FedAvg with fleet-friendly defaults (10 % of online devices per round,
    no federated evaluation round: the simulator scores every device prequentially)."""

    device_app = DeviceApp({MessageType.TRAIN: train, MessageType.EVALUATE: evaluate_received})

    def __init__(self, fraction_train: float = 0.1, fraction_evaluate: float = 0.0,
                 min_train_nodes: int = 2, min_evaluate_nodes: int = 0, min_available_nodes: int = 2, **kwargs) -> None:
        check_fraction("fraction_train", fraction_train)
        check_fraction("fraction_evaluate", fraction_evaluate, allow_zero=True)
        for key, v in (("min_train_nodes", min_train_nodes), ("min_evaluate_nodes", min_evaluate_nodes),
                       ("min_available_nodes", min_available_nodes)):
            check_non_negative(key, v, integer=True)
        # Flower's other keywords: a wrong one would pass silently (a weighting key no reply carries
        # never aggregates) or fail rounds later
        for key in ("weighted_by_key", "arrayrecord_key", "configrecord_key"):
            if key in kwargs and not (isinstance(kwargs[key], str) and kwargs[key]):
                raise ConfigError(key, kwargs[key], "a non-empty string")
        for key in ("train_metrics_aggr_fn", "evaluate_metrics_aggr_fn"):
            if key in kwargs and not callable(kwargs[key]):
                raise ConfigError(key, kwargs[key], "a function (given in Python, not in a config file)")
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate,
                         min_train_nodes=min_train_nodes, min_evaluate_nodes=min_evaluate_nodes,
                         min_available_nodes=min_available_nodes, **kwargs)

    def aggregate_train(self, server_round, replies):
        """Flower's average, except that a round whose valid replies trained on no example
        keeps the global model (Flower's weighted mean would divide by zero)."""
        replies = list(replies)
        records = [next(iter(r.content.metric_records.values()), {}) for r in replies if not r.has_error()]
        if records and not any(self.weighted_by_key in m for m in records):
            raise ValueError(f"no reply carries the metric {self.weighted_by_key!r} it weights by "
                             f"(strategies.fedavg.weighted_by_key; FedAvg's devices report 'num-examples')")
        weight = sum(float(m.get(self.weighted_by_key, 0)) for m in records)
        if weight <= 0:
            return None, None
        # Flower's FedAvg.aggregate_train, with its array average read without np.load
        valid, _ = self._check_and_log_replies(replies, is_train=True)
        if not valid:
            return None, None
        contents = [m.content for m in valid]
        return weighted_mean_arrays(contents, self.weighted_by_key), self.train_metrics_aggr_fn(contents, self.weighted_by_key)
