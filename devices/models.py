"""The recommender backbones as pure functions of a parameter dict, batched over devices.

Every parameter tensor carries a leading *model* dimension ``M``: ``M = 1`` for one
shared model (the cloud model, or all devices holding the same version) and ``M = B``
when B devices each train or score their own copy. Samples carry the same leading
dimension, so one call trains or scores many personalised models at once
(``forward(params, windows[M, N, L], candidates[M, N, C]) -> scores[M, N, C]``), and the
gradient of the summed loss is each model's own gradient because models never mix.
A parameter or sample tensor with ``M = 1`` broadcasts against ``M = B`` ones (e.g. a
shared body with per-device heads).

The backbones themselves are a registry, one module each (``devices.backbones``:
GRU4Rec, DIN, SASRec; embedding dim d = 32 by default). All share the item tables
``item_emb`` and ``item_bias``; every other name carries its part's prefix. ``forward``
finds the backbone from its marker key, so callers never pass it; ``ModelSpec.head_keys()``
names each backbone's head so DUET and MetaPatch can swap or patch it. This module holds
what does not depend on the backbone: the spec, initialisation, the loss, batched SGD and
FLOP counting, and re-exports the backbones' functions under their old names.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from devices.backbones import REGISTRY
from devices.backbones.registry import get as get_backbone
from devices.backbones.din import DIN_ATTENTION, DIN_CHUNK, DIN_HEAD_KEYS, DIN_HIDDEN, din_logits  # noqa: F401
from devices.backbones.gru4rec import HEAD_KEYS, encode  # noqa: F401
from devices.backbones.layers import MASKED, _gather, _layer_norm, _linear, apply_patch, head, score, shared_tables  # noqa: F401
from devices.backbones.layers import training_shortcuts
from devices.backbones.sasrec import SAS_FFN, SAS_HEADS, sas_encode  # noqa: F401
from devices.errors import ConfigError

PAD = -1  # item id used to left-pad windows shorter than L
BACKBONES = tuple(REGISTRY)  # the built-in ones: ("gru4rec", "din", "sasrec")
# One key only each built-in backbone has: how ``forward`` tells them apart (``backbone_of``
# also looks at backbones registered later).
BACKBONE_MARKERS = {name: b.marker for name, b in REGISTRY.items()}


# Upper bounds of model.dim and model.window (README, "[model]"): every interaction's
# window is window item ids and every item an embedding of dim floats, for each of its
# samples, so beyond these a run fails allocating them instead of at validation.
MAX_DIM = 4096
MAX_WINDOW = 1024


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the backbone: which one (``BACKBONES``), catalogue size, embedding dim, window L."""

    n_items: int
    backbone: str = "gru4rec"
    dim: int = 32
    window: int = 10

    def __post_init__(self) -> None:
        try:
            backbone = get_backbone(self.backbone)
        except KeyError as exc:
            raise ConfigError("model.backbone", self.backbone, exc.args[0]) from None
        for key in ("n_items", "dim", "window"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"model.{key}", getattr(self, key), "a positive integer")
        for key, most in (("dim", MAX_DIM), ("window", MAX_WINDOW)):
            if getattr(self, key) > most:
                raise ConfigError(f"model.{key}", getattr(self, key), f"a positive integer, at most {most:,}")
        check = backbone.check
        if check is not None:
            check(self)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter (without the leading model dimension)."""
        items = {"item_emb": (self.n_items, self.dim), "item_bias": (self.n_items,)}
        return {**items, **get_backbone(self.backbone).shapes(self)}

    def head_keys(self) -> tuple[str, ...]:
        """Names of the head (DUET's dynamic part; the rest is the body)."""
        return get_backbone(self.backbone).head_keys

    def n_params(self) -> int:
        return int(sum(np.prod(s) for s in self.shapes().values()))


def init_params(spec: ModelSpec, seed: int) -> dict[str, np.ndarray]:
    """Fresh parameters (float32, no model dimension), seeded.

    Biases 0, LayerNorm gains 1, everything else N(0, 1 / fan_in) (embeddings: 1 / d).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7_001]))
    out = {}
    for name, shape in spec.shapes().items():
        leaf = name.rsplit(".", 1)[-1]
        if ".ln" in name:
            out[name] = (np.ones if leaf == "w" else np.zeros)(shape, np.float32)
        elif leaf.startswith("b") or name == "item_bias":
            out[name] = np.zeros(shape, np.float32)
        else:
            fan_in = spec.dim if name in ("item_emb", "sas.pos") else shape[0]
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


PATCH_LAYERS = ("encoder", "head.1")  # where a MetaPatch residual patch can sit


def patch_keys(layer: str) -> tuple[str, str]:
    """Param names of a residual patch after ``layer`` (see ``apply_patch``)."""
    return f"patch.{layer}.w", f"patch.{layer}.b"


def patch_width(spec: "ModelSpec", layer: str) -> int:
    """Width of the activation a patch after ``layer`` sees: the body output (d) or the
    first head layer (d for the GRU4Rec/SASRec user tower, 128 for DIN's classifier)."""
    if layer not in PATCH_LAYERS:
        raise ConfigError("patch.layer", layer, f"one of {', '.join(PATCH_LAYERS)}")
    width = get_backbone(spec.backbone).head1_width
    return width(spec) if layer == "head.1" and width is not None else spec.dim


def backbone_of(params: dict[str, torch.Tensor]) -> str:
    """Which backbone a param dict belongs to, from its marker key (``BACKBONE_MARKERS``)."""
    for name, backbone in REGISTRY.items():
        if backbone.marker in params:
            return name
    raise ValueError(f"no backbone marker ({', '.join(b.marker for b in REGISTRY.values())}) among the parameters")


def body_output(params: dict[str, torch.Tensor], windows: torch.Tensor) -> torch.Tensor | None:
    """The body's output (M, N, d) for backbones whose body does not look at the
    candidate (GRU4Rec, SASRec); None for DIN. Training only what comes after the body
    (a patch, the head) can compute it once instead of every step."""
    fn = get_backbone(backbone_of(params)).body
    if fn is None:
        return None
    m, n, L = windows.shape
    if m > 1 and all(v.shape[0] == 1 for k, v in params.items() if not k.startswith("patch.")):
        # one shared body: one large matmul over all rows beats M small broadcast ones
        return fn(params, windows.reshape(1, m * n, L)).reshape(m, n, -1)
    return fn(params, windows)


def forward_from_body(params: dict[str, torch.Tensor], h: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Logits (M, N, C) from a ``body_output``: patches, head and scoring."""
    return score(params, head(params, h), candidates)


def forward(params: dict[str, torch.Tensor], windows: torch.Tensor, candidates: torch.Tensor,
            backbone: str | None = None) -> torch.Tensor:
    """Full backbone: logits (M, N, C) of each sample's candidates.

    ``backbone`` defaults to the one the param names say (``backbone_of``).
    """
    backbone = backbone or backbone_of(params)
    try:
        fn = get_backbone(backbone).logits
    except KeyError as exc:
        raise ValueError(f"unknown backbone {backbone!r}: {exc.args[0]}") from None
    return fn(params, windows, candidates)


# A mean BCE this far above the loss of predicting 0 for every candidate (ln 2) means
# logits in the hundreds with the wrong sign: training has diverged even if the number is
# still finite (cloud.lr = 1e6 gives 1e26). Cloud-side training and device replies are
# checked against it.
DIVERGED_LOSS = 100 * math.log(2)


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
    with training_shortcuts():
        for _ in range(steps):
            losses = bce_loss(forward(p, windows, candidates), weight)
            grads = torch.autograd.grad(losses.sum(), [p[k] for k in names])
            with torch.no_grad():
                for k, g in zip(names, grads):
                    p[k] -= lr * g
    return {k: v.detach() for k, v in p.items()}, losses.detach()


@lru_cache(maxsize=16)
def flops_per_sample(spec: ModelSpec, candidates: int, backward: bool, trainable: tuple[str, ...] | None = None) -> int:
    """FLOPs of one sample (window + ``candidates`` items), forward or forward+backward
    (the gradients of ``trainable`` params only, if given: what ``sgd_train`` computes).

    Measured once per shape with ``torch.utils.flop_counter`` (matmul-type ops) on the
    model as written (one ``W_t e`` per candidate, one GRU input projection per window
    position: no ``training_shortcuts``), so a device's compute time follows from the samples
    it trains on: flops x samples x steps, whatever shortcuts the host takes to the same
    values.
    """
    from torch.utils.flop_counter import FlopCounterMode

    p = {k: v.requires_grad_(backward and (trainable is None or k in trainable))
         for k, v in to_torch(init_params(spec, 0)).items()}
    win = torch.zeros(1, 8, spec.window, dtype=torch.long)
    cand = torch.zeros(1, 8, candidates, dtype=torch.long)
    # grad mode on whatever the caller's: without it the forward would take scoring's shortcut
    with FlopCounterMode(display=False) as fc, training_shortcuts(False), torch.enable_grad():
        out = forward(p, win, cand, spec.backbone)
        if backward:
            bce_loss(out, torch.ones(1, 8)).sum().backward()
    return int(fc.get_total_flops() // 8)


def num_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes on the wire for a set of arrays (raw tensor bytes)."""
    return int(sum(a.nbytes for a in arrays.values()))
