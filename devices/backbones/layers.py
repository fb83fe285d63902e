"""Operations the backbones share, batched over a leading model dimension M (see
``devices.models``): row lookup, linear maps, LayerNorm, the MetaPatch residual patch,
and the user tower + dot-product scoring of GRU4Rec and SASRec."""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch

MASKED = -1e9  # additive attention bias of padding keys: finite, so an all-PAD window has no NaN


_SHORTCUTS = contextvars.ContextVar("training_shortcuts", default=False)  # per thread


@contextlib.contextmanager
def training_shortcuts(on: bool = True) -> Iterator[None]:
    """Within it, training takes shortcuts to the same values as the models' formulas as
    written: ``user W_t^T`` once per sample instead of ``W_t e`` per candidate, and the
    GRU's recurrence with its backward written out (``gru4rec._Recurrence``). Values and
    gradients agree to float32 rounding. ``models.sgd_train`` (device training, batched
    over devices) runs under it; cloud-side training and ``models.flops_per_sample`` (a
    device's FLOPs are those of the model as written) do not: ``training_shortcuts(False)``."""
    token = _SHORTCUTS.set(on)
    try:
        yield
    finally:
        _SHORTCUTS.reset(token)


def shortcuts() -> bool:
    """Whether ``training_shortcuts`` is on in this thread."""
    return _SHORTCUTS.get()


def _gather(table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Row lookup per model: table (M, V, ...) and ids (M, ...) -> (M, ..., rest).

    Either side may have M = 1 (one shared table for many devices' ids, or one set of
    ids looked up in many models' tables); PAD ids read row 0, which callers mask.
    """
    m = table.shape[0]
    if m == 1 and ids.shape[0] == 1 and not table.requires_grad:
        # one shared table, nothing to differentiate: a plain row lookup (same values, faster)
        return table[0].index_select(0, ids.reshape(-1).clamp(min=0)).reshape(*ids.shape, *table.shape[2:])
    if ids.shape[0] != m and m > 1:
        if ids.shape[0] != 1:
            raise ValueError(f"table has {m} models but ids have {ids.shape[0]}")
        ids = ids.expand(m, *ids.shape[1:])
    flat = ids.reshape(m, -1)
    rows = torch.arange(m).unsqueeze(1).expand_as(flat)
    out = table[rows, flat.clamp(min=0)]
    return out.reshape(*ids.shape, *table.shape[2:])


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


def head(params: dict[str, torch.Tensor], h: torch.Tensor) -> torch.Tensor:
    """GRU4Rec/SASRec head (user tower): hidden state (M, N, d) -> user vector (M, N, d)."""
    h = apply_patch(params, h, "encoder")
    u = apply_patch(params, torch.relu(torch.matmul(h, params["head.w1"]) + params["head.b1"].unsqueeze(1)), "head.1")
    return torch.matmul(u, params["head.w2"]) + params["head.b2"].unsqueeze(1)


def score(params: dict[str, torch.Tensor], user: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Logits of candidates (M, N, C) for user vectors (M, N, d)."""
    if SHARED_TARGET in params:  # every item's W_t e_item, computed once (``shared_tables``)
        items = params[SHARED_TARGET]
        if items.shape[1] <= FULL_SCORE_ITEMS_PER_CANDIDATE * candidates.shape[-1]:
            # a small catalogue: every item's logit in one matmul, then pick the candidates
            u = user.reshape(-1, user.shape[-1])
            bias = params["item_bias"]
            if bias.shape[0] == 1:  # the bias added in the same call (same sums, one pass fewer)
                every = torch.addmm(bias[0], u, items[0].T)
                return torch.gather(every, 1, candidates.reshape(every.shape[0], -1)).reshape(candidates.shape)
            every = torch.matmul(u, items[0].T)
            picked = torch.gather(every, 1, candidates.reshape(every.shape[0], -1))
            return picked.reshape(candidates.shape) + _gather(bias, candidates)
        t = _gather(items, candidates)
    elif shortcuts() or not torch.is_grad_enabled():
        # (W_t e) . user = e . (user W_t^T): one d x d product per sample instead of one per
        # candidate, in device training and in scoring without gradients (the same logits
        # to float32 rounding); cloud training and FLOP counting take the model as written
        t = _gather(params["item_emb"], candidates)  # (M, N, C, d)
        user = _linear(user, params["target.w"].transpose(1, 2))
    else:
        e = _gather(params["item_emb"], candidates)  # (M, N, C, d)
        t = torch.matmul(e, params["target.w"].unsqueeze(1))
    return (t * user.unsqueeze(2)).sum(-1) + _gather(params["item_bias"], candidates)


# Derived tables of one shared model that scores many samples (``shared_tables``): the
# per-item products every sample would otherwise recompute. Row i of ``table @ W`` is the
# same float32 result as ``table[i] @ W``, so scores are bit-identical either way.
SHARED_TARGET = "~target.items"  # item_emb @ target.w, (1, V, d)
SHARED_GRU_IN = "~gru.items"  # item_emb @ gru.w_ih + gru.b, (1, V, 3d)
# With a shared model, scoring every item of a catalogue of up to this many items per
# candidate (one matmul) is cheaper than gathering the candidates' rows: 3.8 vs 11 us per
# sample of 100 candidates at 1,000 items, d = 32 (the sum runs in another order: logits
# agree to ~1e-7, not bit for bit).
FULL_SCORE_ITEMS_PER_CANDIDATE = 16


def shared_tables(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``params`` of one shared model (M = 1) plus the per-item products its forward
    would compute for every sample, for scoring many samples without gradients."""
    out = dict(params)
    emb = params.get("item_emb")
    if emb is None or emb.shape[0] != 1 or any(k.startswith("patch.") for k in params):
        return out
    if "target.w" in params and params["target.w"].shape[0] == 1:
        out[SHARED_TARGET] = torch.matmul(emb, params["target.w"])
    if "gru.w_ih" in params and params["gru.w_ih"].shape[0] == 1:
        out[SHARED_GRU_IN] = torch.matmul(emb, params["gru.w_ih"]) + params["gru.b"].unsqueeze(1)
    return out


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
