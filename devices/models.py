"""The recommender backbone as pure functions of a parameter dict, batched over devices.

Every parameter tensor carries a leading *model* dimension ``M``: ``M = 1`` for one
shared model (the cloud model, or all devices holding the same version) and ``M = B``
when B devices each train or score their own copy. Samples carry the same leading
dimension, so one call trains or scores many personalised models at once
(``forward(params, windows[M, N, L], candidates[M, N, C]) -> scores[M, N, C]``), and the
gradient of the summed loss is each model's own gradient because models never mix.

GRU4Rec-style backbone (METHODS.md): item embeddings (dim 32) and a GRU over the last
L items form the *body*; a two-layer 32x32 user tower forms the *head*; a candidate's
score is ``user_vector . (W_t e_item) + b_item``. ``HEAD_KEYS`` names the head so DUET
and MetaPatch can swap or patch it.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from simulator.errors import ConfigError

PAD = -1  # item id used to left-pad windows shorter than L
HEAD_KEYS = ("head.w1", "head.b1", "head.w2", "head.b2")
BACKBONES = ("gru4rec",)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the backbone: which one, catalogue size, embedding dim, window length L."""

    n_items: int
    backbone: str = "gru4rec"
    dim: int = 32
    window: int = 10

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ConfigError("model.backbone", self.backbone, f"one of {', '.join(BACKBONES)}")
        for key in ("n_items", "dim", "window"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}", getattr(self, key), "a positive integer")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter (without the leading model dimension)."""
        d = self.dim
        return {
            "item_emb": (self.n_items, d),
            "item_bias": (self.n_items,),
            "gru.w_ih": (d, 3 * d),
            "gru.w_hh": (d, 3 * d),
            "gru.b": (3 * d,),
            "target.w": (d, d),
            "head.w1": (d, d),
            "head.b1": (d,),
            "head.w2": (d, d),
            "head.b2": (d,),
        }

    def n_params(self) -> int:
        return int(sum(np.prod(s) for s in self.shapes().values()))


def init_params(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Fresh parameters (float32, no model dimension), seeded."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7_001]))
    out = {}
    for name, shape in spec.shapes().items():
        if name.endswith((".b", ".b1", ".b2")) or name == "item_bias":
            out[name] = np.zeros(shape, np.float32)
        else:
            fan_in = shape[0] if name != "item_emb" else spec.dim
            out[name] = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    return out


def to_torch(params: dict[str, np.ndarray], models: int | None = None) -> dict[str, torch.Tensor]:
    """numpy params -> torch with a leading model dim (added if ``models`` is None)."""
    if models is None:
        return {k: torch.from_numpy(np.ascontiguousarray(v))[None] for k, v in params.items()}
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in params.items()}


def stack(param_dicts: list[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
    """Stack per-device numpy param dicts into one batched torch dict (model dim first)."""
    return {k: torch.from_numpy(np.stack([p[k] for p in param_dicts])) for k in param_dicts[0]}


def _gather(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row lookup per model: table (M, V, ...) and ids (M, ...) -> (M, ..., rest)."""
    m = table.shape[0]
    flat = ids.reshape(m, -1)
    rows = torch.arange(m).unsqueeze(1).expand_as(flat)
    out = table[rows, flat.clamp(min=0)]
    return out.reshape(*ids.shape, *table.shape[2:])


def encode(params: dict[str, torch.Tensor], windows: torch.Tensor) -> torch.Tensor:
    """Body: windows (M, N, L) item ids (PAD on the left) -> hidden state (M, N, d)."""
    m, n, L = windows.shape
    x = _gather(params["item_emb"], windows)  # (M, N, L, d)
    mask = (windows >= 0).unsqueeze(-1).to(x.dtype)
    d = x.shape[-1]
    h = x.new_zeros(m, n, d)
    w_ih, w_hh, b = params["gru.w_ih"], params["gru.w_hh"], params["gru.b"].unsqueeze(1)
    gi_all = torch.matmul(x.reshape(m, n * L, d), w_ih).reshape(m, n, L, 3 * d) + b.unsqueeze(2)
    # unbind, not gi_all[:, :, t]: each select's backward would zero-fill a full-size grad
    steps, masks = gi_all.unbind(2), mask.unbind(2)
    for t in range(L):
        gi = steps[t]
        gh = torch.matmul(h, w_hh)
        i_r, i_z, i_n = gi.chunk(3, -1)  # chunk, not slices: no zero-filled grads
        h_r, h_z, h_n = gh.chunk(3, -1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        c = torch.tanh(i_n + r * h_n)
        h_new = (1 - z) * c + z * h
        mt = masks[t]
        h = mt * h_new + (1 - mt) * h
    return h


def head(params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """Head (user tower): hidden state (M, N, d) -> user vector (M, N, d)."""
    u = torch.relu(torch.matmul(h, params["head.w1"]) + params["head.b1"].unsqueeze(1))
    return torch.matmul(u, params["head.w2"]) + params["head.b2"].unsqueeze(1)


def score(params: dict[str, torch.Tensor], user: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Logits of candidates (M, N, C) for user vectors (M, N, d)."""
    e = _gather(params["item_emb"], candidates)  # (M, N, C, d)
    t = torch.matmul(e, params["target.w"].unsqueeze(1))
    return (t * user.unsqueeze(2)).sum(-1) + _gather(params["item_bias"], candidates)


def forward(params: dict[str, torch.Tensor], windows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Full backbone: logits (M, N, C) of each sample's candidates."""
    return score(params, head(params, encode(params, windows)), candidates)


def bce_loss(logits: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per-model mean BCE; column 0 is the positive. ``weight`` (M, N) masks padding rows.

    Returns a (M,) tensor: each model's loss over its own valid rows only.
    """
    labels = torch.zeros_like(logits)
    labels[..., 0] = 1.0
    per = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(-1)
    denom = weight.sum(-1).clamp(min=1.0)
    return (per * weight).sum(-1) / denom


def sgd_train(
    params: dict[str, torch.Tensor],
    windows: torch.Tensor,
    candidates: torch.Tensor,
    weight: torch.Tensor,
    steps: int,
    lr: float,
    trainable: tuple[str, ...] | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """``steps`` full-batch SGD steps on every model at once; returns new params, last losses.

    Full-batch steps keep devices with different sample counts in lockstep (padding rows
    carry weight 0), and plain SGD leaves untouched embedding rows bit-identical.
    """
    names = trainable or tuple(params)
    p = {k: (v.detach().clone().requires_grad_(True) if k in names else v) for k, v in params.items()}
    losses = torch.zeros(windows.shape[0])
    for _ in range(steps):
        losses = bce_loss(forward(p, windows, candidates), weight)
        grads = torch.autograd.grad(losses.sum(), [p[k] for k in names])
        with torch.no_grad():
            for k, g in zip(names, grads):
                p[k] -= lr * g
    return {k: v.detach() for k, v in p.items()}, losses.detach()


@lru_cache(maxsize=16)
def flops_per_sample(spec: ModelSpec, candidates: int, backward: bool) -> int:
    """FLOPs of one sample (window + ``candidates`` items), forward or forward+backward.

    Measured once per shape with ``torch.utils.flop_counter`` (matmul-type ops), so device
    compute time follows from the work actually done: flops x samples x steps.
    """
    from torch.utils.flop_counter import FlopCounterMode

    p = {k: v.requires_grad_(backward) for k, v in to_torch(init_params(spec, 0)).items()}
    win = torch.zeros(1, 8, spec.window, dtype=torch.long)
    cand = torch.zeros(1, 8, candidates, dtype=torch.long)
    with FlopCounterMode(display=False) as fc:
        out = forward(p, win, cand)
        if backward:
            bce_loss(out, torch.ones(1, 8)).sum().backward()
    return int(fc.get_total_flops() // 8)


def num_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes on the wire for a set of arrays (raw tensor bytes)."""
    return int(sum(a.nbytes for a in arrays.values()))
