"""DIN: target attention over the window (``din.att.*``, the activation unit; masked
softmax) pools the history per candidate; [interest, e_target] (2d) -> the classifier
2d -> 128 -> 64 -> 1 (``head.*``, the head) + ``b_item``."""
from __future__ import annotations

import torch

from devices.backbones.registry import Backbone, register
from devices.backbones.gru4rec import HEAD_KEYS
from devices.backbones.layers import MASKED, _gather, _linear, apply_patch

DIN_HEAD_KEYS = (*HEAD_KEYS, "head.w3", "head.b3")  # DIN's 2d -> 128 -> 64 -> 1 classifier
DIN_ATTENTION = 36  # hidden units of DIN's activation unit (the paper's Fig. 2)
DIN_HIDDEN = (128, 64)  # classifier widths: 2d -> 128 -> 64 -> 1
DIN_CHUNK = 2**23  # largest (M, N, C, L, hidden) activation DIN builds per pass when not training


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


def logits(params: dict[str, torch.Tensor], windows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``din_logits``, in row chunks when scoring many rows (bounds the (N, C, L, hidden)
    activations); training always runs in one pass."""
    training = torch.is_grad_enabled() and any(v.requires_grad for v in params.values())
    m, n, c = candidates.shape
    rows = max(1, DIN_CHUNK // (max(m, params["din.att.w1"].shape[0]) * c * windows.shape[-1] * DIN_ATTENTION))
    if training or n <= rows:
        return din_logits(params, windows, candidates)
    parts = [din_logits(params, w, cd) for w, cd in zip(windows.split(rows, 1), candidates.split(rows, 1))]
    return torch.cat(parts, 1)


def shapes(spec) -> dict[str, tuple[int, ...]]:
    d, (h1, h2) = spec.dim, DIN_HIDDEN
    return {
        "din.att.w1": (4 * d, DIN_ATTENTION),  # rows: blocks for [e_h, e_t, e_h - e_t, e_h * e_t]
        "din.att.b1": (DIN_ATTENTION,), "din.att.w2": (DIN_ATTENTION, 1), "din.att.b2": (1,),
        "head.w1": (2 * d, h1), "head.b1": (h1,), "head.w2": (h1, h2), "head.b2": (h2,), "head.w3": (h2, 1),
        "head.b3": (1,),
    }


register(Backbone(name="din", marker="din.att.w1", head_keys=DIN_HEAD_KEYS, logits=logits, shapes=shapes,
                  head1_width=lambda spec: DIN_HIDDEN[0]))
