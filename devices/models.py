"""The recommender backbones as pure functions of a parameter dict, batched over devices.

Every parameter tensor carries a leading *model* dimension ``M``: ``M = 1`` for one
shared model (the cloud model, or all devices holding the same version) and ``M = B``
when B devices each train or score their own copy. Samples carry the same leading
dimension, so one call trains or scores many personalised models at once
(``forward(params, windows[M, N, L], candidates[M, N, C]) -> scores[M, N, C]``), and the
gradient of the summed loss is each model's own gradient because models never mix.
A parameter or sample tensor with ``M = 1`` broadcasts against ``M = B`` ones (e.g. a
shared body with per-device heads).

Three backbones (METHODS.md, "Shared setting"; embedding dim d = 32). All share the item
tables ``item_emb`` and ``item_bias``; every other name carries its part's prefix.

- **GRU4Rec**: a GRU over the last L items (``gru.*``) forms the *body*; a two-layer
  32x32 user tower (``head.*``) the *head*; a candidate's score is
  ``user . (W_t e_item) + b_item`` (``target.w`` is body).
- **SASRec**: item + learned position embeddings, one post-LayerNorm Transformer encoder
  layer (4 heads, ReLU FFN 128; ``sas.*``), the last position's output -> the same user
  tower head and score as GRU4Rec.
- **DIN**: target attention over the window (``din.att.*``, the activation unit; masked
  softmax) pools the history per candidate; [interest, e_target] (2d = 64) -> the classifier
  64 -> 128 -> 64 -> 1 (``head.*``, the head) + ``b_item``.

``forward`` finds the backbone from a marker key (``BACKBONE_MARKERS``), so callers never
pass it; ``ModelSpec.head_keys()`` names each backbone's head (``HEAD_KEYS`` is GRU4Rec's
and SASRec's) so DUET and MetaPatch can swap or patch it.
"""
from __future__ import annotations

import math

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from devices.errors import ConfigError

PAD = -1  # item id used to left-pad windows shorter than L
BACKBONES = ("gru4rec", "din", "sasrec")
HEAD_KEYS = ("head.w1", "head.b1", "head.w2", "head.b2")  # user tower of GRU4Rec and SASRec
DIN_HEAD_KEYS = (*HEAD_KEYS, "head.w3", "head.b3")  # DIN's 2d -> 128 -> 64 -> 1 classifier
# One key only each backbone has: how ``forward`` tells them apart.
BACKBONE_MARKERS = {"gru4rec": "gru.w_ih", "din": "din.att.w1", "sasrec": "sas.w_qkv"}
DIN_ATTENTION = 36  # hidden units of DIN's activation unit (the paper's Fig. 2)
DIN_HIDDEN = (128, 64)  # DIN classifier widths (METHODS.md: 64 -> 128 -> 64 -> 1)
SAS_HEADS, SAS_FFN = 4, 128
MASKED = -1e9  # additive attention bias of padding keys: finite, so an all-PAD window has no NaN
DIN_CHUNK = 2**23  # largest (M, N, C, L, hidden) activation DIN builds per pass when not training


@dataclass(frozen=True)
class ModelSpec:
    """Shape of the backbone: which one (``BACKBONES``), catalogue size, embedding dim, window L."""

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
        if self.backbone == "sasrec" and self.dim % SAS_HEADS:
            raise ConfigError("model.dim", self.dim, f"a multiple of {SAS_HEADS} for sasrec ({SAS_HEADS} heads)")

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Name -> shape of every parameter (without the leading model dimension)."""
        d = self.dim
        items = {"item_emb": (self.n_items, d), "item_bias": (self.n_items,)}
        tower = {"target.w": (d, d), "head.w1": (d, d), "head.b1": (d,), "head.w2": (d, d), "head.b2": (d,)}
        if self.backbone == "gru4rec":
            return {**items, "gru.w_ih": (d, 3 * d), "gru.w_hh": (d, 3 * d), "gru.b": (3 * d,), **tower}
        if self.backbone == "sasrec":
            return {
                **items,
                "sas.pos": (self.window, d),
                "sas.w_qkv": (d, 3 * d),
                "sas.b_qkv": (3 * d,),
                "sas.w_o": (d, d),
                "sas.b_o": (d,),
                "sas.ln1.w": (d,),
                "sas.ln1.b": (d,),
                "sas.w_ff1": (d, SAS_FFN),
                "sas.b_ff1": (SAS_FFN,),
                "sas.w_ff2": (SAS_FFN, d),
                "sas.b_ff2": (d,),
                "sas.ln2.w": (d,),
                "sas.ln2.b": (d,),
                **tower,
            }
        h1, h2 = DIN_HIDDEN
        return {
            **items,
            "din.att.w1": (4 * d, DIN_ATTENTION),  # rows: blocks for [e_h, e_t, e_h - e_t, e_h * e_t]
            "din.att.b1": (DIN_ATTENTION,),
            "din.att.w2": (DIN_ATTENTION, 1),
            "din.att.b2": (1,),
            "head.w1": (2 * d, h1),
            "head.b1": (h1,),
            "head.w2": (h1, h2),
            "head.b2": (h2,),
            "head.w3": (h2, 1),
            "head.b3": (1,),
        }

    def head_keys(self) -> tuple[str, ...]:
        """Names of the head (DUET's dynamic part; the rest is the body)."""
        return DIN_HEAD_KEYS if self.backbone == "din" else HEAD_KEYS

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


def _gather(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row lookup per model: table (M, V, ...) and ids (M, ...) -> (M, ..., rest).

    Either side may have M = 1 (one shared table for many devices' ids, or one set of
    ids looked up in many models' tables); PAD ids read row 0, which callers mask.
    """
    m = table.shape[0]
    if ids.shape[0] != m and m > 1:
        if ids.shape[0] != 1:
            raise ValueError(f"table has {m} models but ids have {ids.shape[0]}")
        ids = ids.expand(m, *ids.shape[1:])
    flat = ids.reshape(m, -1)
    rows = torch.arange(m).unsqueeze(1).expand_as(flat)
    out = table[rows, flat.clamp(min=0)]
    return out.reshape(*ids.shape, *table.shape[2:])


PATCH_LAYERS = ("encoder", "head.1")  # where a MetaPatch residual patch can sit


def patch_keys(layer: str) -> tuple[str, str]:
    """Param names of a residual patch after ``layer`` (see ``apply_patch``)."""
    return f"patch.{layer}.w", f"patch.{layer}.b"


def patch_width(spec: "ModelSpec", layer: str) -> int:
    """Width of the activation a patch after ``layer`` sees: the body output (d) or the
    first head layer (d for the GRU4Rec/SASRec user tower, 128 for DIN's classifier)."""
    if layer not in PATCH_LAYERS:
        raise ConfigError("patch.layer", layer, f"one of {', '.join(PATCH_LAYERS)}")
    if layer == "head.1" and spec.backbone == "din":
        return DIN_HIDDEN[0]
    return spec.dim


def apply_patch(params: dict[str, torch.Tensor], h: torch.Tensor, layer: str) -> torch.Tensor:
    """MetaPatch residual patch h <- h + (h W + b), if the params hold one for ``layer``.

    ``h`` is (M, N, ..., width); W (M, width, width) and b (M, width) may hold one patch
    per device (M = B) on a shared model (M = 1). A zero patch is the identity.
    """
    w = params.get(f"patch.{layer}.w")
    if w is None:
        return h
    lead = [1] * (h.dim() - 3)
    w = w.reshape(w.shape[0], *lead, *w.shape[1:])
    b = params[f"patch.{layer}.b"].reshape(w.shape[0], *lead, 1, -1)
    return h + torch.matmul(h, w) + b


def encode(params: dict[str, torch.Tensor], windows: torch.Tensor) -> torch.Tensor:
    """GRU4Rec body: windows (M, N, L) item ids (PAD on the left) -> hidden state (M, N, d)."""
    _, n, L = windows.shape
    x = _gather(params["item_emb"], windows)  # (M, N, L, d)
    mask = (windows >= 0).unsqueeze(-1).to(x.dtype)
    m, d = x.shape[0], x.shape[-1]
    h = x.new_zeros(m, n, d)
    w_ih, w_hh, b = params["gru.w_ih"], params["gru.w_hh"], params["gru.b"].unsqueeze(1)
    # -1: the GRU weights may hold more models than the window's table (M = 1 broadcasts)
    gi_all = torch.matmul(x.reshape(m, n * L, d), w_ih).reshape(-1, n, L, 3 * d) + b.unsqueeze(2)
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
    """GRU4Rec/SASRec head (user tower): hidden state (M, N, d) -> user vector (M, N, d)."""
    h = apply_patch(params, h, "encoder")
    u = apply_patch(params, torch.relu(torch.matmul(h, params["head.w1"]) + params["head.b1"].unsqueeze(1)), "head.1")
    return torch.matmul(u, params["head.w2"]) + params["head.b2"].unsqueeze(1)


def score(params: dict[str, torch.Tensor], user: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Logits of candidates (M, N, C) for user vectors (M, N, d)."""
    e = _gather(params["item_emb"], candidates)  # (M, N, C, d)
    t = torch.matmul(e, params["target.w"].unsqueeze(1))
    return (t * user.unsqueeze(2)).sum(-1) + _gather(params["item_bias"], candidates)


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, ..., i) @ w (M, i, o) [+ b (M, o)] -> (M, ..., o) as one bmm (M = 1 broadcasts)."""
    y = torch.matmul(x.reshape(x.shape[0], -1, x.shape[-1]), w)
    y = y.reshape(y.shape[0], *x.shape[1:-1], w.shape[-1])
    if b is not None:
        y = y + b.reshape(b.shape[0], *([1] * (x.dim() - 2)), b.shape[-1])
    return y


def _layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim with per-model gain and bias w, b (M, d)."""
    y = torch.nn.functional.layer_norm(x, x.shape[-1:])
    shape = (w.shape[0], *([1] * (x.dim() - 2)), w.shape[-1])
    return y * w.reshape(shape) + b.reshape(shape)


def sas_encode(params: dict[str, torch.Tensor], windows: torch.Tensor) -> torch.Tensor:
    """SASRec body: windows (M, N, L) -> the last position's encoder output (M, N, d).

    One post-LN encoder layer: h = LN(x + MHA(x)), out = LN(h + FFN(h)). Only the last
    position's output is used, so only its query (and FFN) is computed: with one layer
    this equals running the full layer, and no causal mask is needed. PAD keys get an
    additive -1e9 and their weights are zeroed after the softmax, so an all-PAD window
    attends to nothing (finite, no NaN) and its output depends on the parameters only.
    """
    m, n, L = windows.shape
    valid = windows >= 0
    x = _gather(params["item_emb"], windows) * valid.unsqueeze(-1).to(params["item_emb"].dtype)
    x = x + params["sas.pos"].unsqueeze(1)  # (M, N, L, d)
    d = x.shape[-1]
    h, dh = SAS_HEADS, d // SAS_HEADS
    w_q, w_kv = params["sas.w_qkv"].split([d, 2 * d], -1)
    b_q, b_kv = params["sas.b_qkv"].split([d, 2 * d], -1)
    k, v = _linear(x, w_kv, b_kv).chunk(2, -1)  # chunk: both halves get grads, no zero fill
    # one select (not one per step): a single x-sized zero fill in backward
    last = x.select(2, L - 1)  # (M, N, d)
    q = _linear(last, w_q, b_q)
    q = q.reshape(q.shape[0], n, h, 1, dh)
    k = k.reshape(k.shape[0], n, L, h, dh).permute(0, 1, 3, 4, 2)  # (M, N, H, dh, L)
    v = v.reshape(v.shape[0], n, L, h, dh).transpose(2, 3)  # (M, N, H, L, dh)
    keep = valid.to(x.dtype).reshape(valid.shape[0], n, 1, 1, L)
    att = torch.softmax(torch.matmul(q, k) / dh**0.5 + (1 - keep) * MASKED, -1) * keep
    ctx = torch.matmul(att, v)  # (M, N, H, 1, dh)
    ctx = _linear(ctx.reshape(ctx.shape[0], n, d), params["sas.w_o"], params["sas.b_o"])
    h1 = _layer_norm(last + ctx, params["sas.ln1.w"], params["sas.ln1.b"])
    ff = _linear(torch.relu(_linear(h1, params["sas.w_ff1"], params["sas.b_ff1"])), params["sas.w_ff2"], params["sas.b_ff2"])
    return _layer_norm(h1 + ff, params["sas.ln2.w"], params["sas.ln2.b"])


def din_logits(params: dict[str, torch.Tensor], windows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """DIN: logits (M, N, C); each candidate is the target its own attention looks for.

    Activation unit: a_j = w2 . sigmoid(W1 [e_h, e_t, e_h - e_t, e_h * e_t] + b1) + b2 per
    history item (sigmoid as in the authors' released code; the paper draws PReLU/Dice).
    interest = sum_j softmax(a)_j e_j over the valid items, the masked softmax of the
    authors' released code. The paper argues for the unnormalised sum_j a_j e_j, but with
    plain on-device SGD at the default lr 0.5 that sum diverged within 5 steps on the test
    fleet (a scales the interest vector, which scales a's gradient); the softmax stays
    stable. PAD items get weight exactly 0, so an all-PAD window has interest 0 (no NaN).
    Classifier (the head): ReLU MLP on [interest, e_t] -> 128 -> 64 -> 1, plus ``item_bias``.

    W1's four row blocks are applied as e_h (W_a + W_c) + e_t (W_b - W_c) + (e_h * e_t) W_d,
    which equals the concatenation's product exactly and computes the e_h and e_t terms
    once per history item and per candidate instead of per (candidate, history item).
    """
    valid = (windows >= 0).unsqueeze(-1).to(params["item_emb"].dtype)
    e_h = _gather(params["item_emb"], windows) * valid  # (M, N, L, d)
    e_t = _gather(params["item_emb"], candidates)  # (M, N, C, d)
    w_a, w_b, w_c, w_d = params["din.att.w1"].chunk(4, -2)
    pre = (_linear(e_t.unsqueeze(3) * e_h.unsqueeze(2), w_d)  # (M, N, C, L, A)
           + _linear(e_h, w_a + w_c).unsqueeze(2)
           + _linear(e_t, w_b - w_c, params["din.att.b1"]).unsqueeze(3))
    a = _linear(torch.sigmoid(pre), params["din.att.w2"], params["din.att.b2"]).squeeze(-1)  # (M, N, C, L)
    keep = valid.squeeze(-1).unsqueeze(2)  # (M, N, 1, L)
    a = torch.softmax(a + (1 - keep) * MASKED, -1) * keep
    interest = apply_patch(params, torch.matmul(a, e_h), "encoder")  # (M, N, C, d)
    z = torch.cat([interest, e_t.expand_as(interest)], -1)
    z = apply_patch(params, torch.relu(_linear(z, params["head.w1"], params["head.b1"])), "head.1")
    z = torch.relu(_linear(z, params["head.w2"], params["head.b2"]))
    out = _linear(z, params["head.w3"], params["head.b3"]).squeeze(-1)
    return out + _gather(params["item_bias"], candidates)


def backbone_of(params: dict[str, torch.Tensor]) -> str:
    """Which backbone a param dict belongs to, from its marker key (``BACKBONE_MARKERS``)."""
    for name, key in BACKBONE_MARKERS.items():
        if key in params:
            return name
    raise ValueError(f"no backbone marker ({', '.join(BACKBONE_MARKERS.values())}) among the parameters")


def body_output(params: dict[str, torch.Tensor], windows: torch.Tensor) -> torch.Tensor | None:
    """The body's output (M, N, d) for backbones whose body does not look at the
    candidate (GRU4Rec, SASRec); None for DIN. Training only what comes after the body
    (a patch, the head) can compute it once instead of every step."""
    backbone = backbone_of(params)
    if backbone == "din":
        return None
    fn = encode if backbone == "gru4rec" else sas_encode
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
    if backbone == "gru4rec":
        return score(params, head(params, encode(params, windows)), candidates)
    if backbone == "sasrec":
        return score(params, head(params, sas_encode(params, windows)), candidates)
    if backbone != "din":
        raise ValueError(f"unknown backbone {backbone!r}; one of {', '.join(BACKBONES)}")
    training = torch.is_grad_enabled() and any(v.requires_grad for v in params.values())
    m, n, c = candidates.shape
    rows = max(1, DIN_CHUNK // (max(m, params["din.att.w1"].shape[0]) * c * windows.shape[-1] * DIN_ATTENTION))
    if training or n <= rows:
        return din_logits(params, windows, candidates)
    # Scoring many rows x 100 candidates: bound the (N, C, L, hidden) activations.
    parts = [din_logits(params, w, cd) for w, cd in zip(windows.split(rows, 1), candidates.split(rows, 1))]
    return torch.cat(parts, 1)


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
        out = forward(p, win, cand, spec.backbone)
        if backward:
            bce_loss(out, torch.ones(1, 8)).sum().backward()
    return int(fc.get_total_flops() // 8)


def num_bytes(arrays: dict[str, np.ndarray]) -> int:
    """Bytes on the wire for a set of arrays (raw tensor bytes)."""
    return int(sum(a.nbytes for a in arrays.values()))
