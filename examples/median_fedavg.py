"""A second user strategy: FedAvg with a coordinate-wise median in place of the mean (a
robust aggregate: one device with wild weights cannot drag the model).

It reuses FedAvg's device function and sampling and overrides only the aggregation.
Plug it in with ``strategies = ["examples.median_fedavg:MedianFedAvg"]``.
"""
import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord

from strategies.fedavg import FedAvg


class MedianFedAvg(FedAvg):
    """Server half: the element-wise median of the valid replies' arrays."""

    def aggregate_train(self, server_round, replies):
        ok = [r for r in replies if not r.has_error()]
        if not ok:
            return None, None
        records = [r.content.array_records["arrays"] for r in ok]
        median = {k: Array(np.median(np.stack([rec[k].numpy() for rec in records]), axis=0).astype(np.float32))
                  for k in records[0].keys()}
        losses = [float(r.content.metric_records["metrics"]["train_loss"]) for r in ok]
        return ArrayRecord(median), MetricRecord({"train_loss": float(np.median(losses))})
