"""A complete user strategy: devices fine-tune only the head (user tower) of their model.

Server half: a ``FleetStrategy`` (a Flower ``Strategy`` with fleetsim's contract,
``strategies/base.py``) that asks a fraction of the online devices to train. Device half:
``train`` runs on many devices at once (``ctx.device_ids``) and returns one reply per
device. Plug it in with ``strategies = ["examples.head_finetune:HeadFinetune"]``.
"""
from flwr.app import Message, MessageType, RecordDict

from devices.runtime import DeviceApp, DeviceContext, Payload, train_held_models
from strategies.base import FleetStrategy
from strategies.common import mean_metrics, sample_fraction


def train(ctx: DeviceContext, payload: Payload) -> list[Payload]:
    """Device half: SGD on the head only; the body stays the cloud's, bit for bit."""
    steps = int(payload.config()["local-steps"])
    head = ctx.spec.head_keys()  # the backbone's head: user tower (GRU4Rec, SASRec) or MLP (DIN)
    new, losses, counts = train_held_models(ctx, steps, ctx.settings.lr, trainable=head)
    ctx.set_personal({k: new[k] for k in head})
    return [Payload(metrics={"m": {"num-examples": int(n), "loss": float(l)}}) for n, l in zip(counts, losses)]


class HeadFinetune(FleetStrategy):
    """Server half: pick devices, send them a config, average their reported losses."""

    device_app = DeviceApp({MessageType.TRAIN: train})

    def __init__(self, fraction_train: float = 0.5, local_steps: int = 5) -> None:
        self.fraction_train, self.local_steps = fraction_train, local_steps

    def configure_train(self, server_round, arrays, config, grid):
        nodes = sample_fraction(grid, self.fraction_train, 1)
        content = RecordDict({"config": self.device_config(server_round)})  # server-round + local-steps
        return [Message(content, dst_node_id=n, message_type=MessageType.TRAIN) for n in nodes]

    def aggregate_train(self, server_round, replies):
        return None, mean_metrics(replies)
