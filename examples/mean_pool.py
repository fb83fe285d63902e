"""A user backbone: the user vector is the mean of the window's item embeddings (the
body), passed through the shared two-layer user tower (the head).

Plug it in with ``[model] backbone = "examples.mean_pool:BACKBONE"``; every strategy
(DUET generates its head, MetaPatch patches its encoder output) works with it unchanged.
"""
import torch

from devices.backbones.layers import _gather, head, score
from devices.backbones.registry import Backbone
from devices.backbones.gru4rec import HEAD_KEYS, tower


def encode(params: dict[str, torch.Tensor], windows: torch.Tensor) -> torch.Tensor:
    """Windows (M, N, L) item ids, PAD < 0 -> mean of the real items' embeddings (M, N, d)."""
    x = _gather(params["item_emb"], windows)  # (M, N, L, d)
    mask = (windows >= 0).unsqueeze(-1).to(x.dtype)
    if x.shape[0] != mask.shape[0]:
        mask = mask.expand(x.shape[0], *mask.shape[1:])
    pooled = (x * mask).sum(2) / mask.sum(2).clamp(min=1.0)
    return torch.matmul(pooled, params["pool.w"])  # the marker: a d x d mixing of the mean


def logits(params: dict[str, torch.Tensor], windows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    return score(params, head(params, encode(params, windows)), candidates)


BACKBONE = Backbone(name="mean_pool", marker="pool.w", head_keys=HEAD_KEYS, logits=logits, body=encode,
                    shapes=lambda spec: {"pool.w": (spec.dim, spec.dim), **tower(spec.dim)})
