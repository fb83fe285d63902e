"""GRU4Rec: a GRU over the last L items (``gru.*``) is the body; a two-layer d x d user
tower (``head.*``) the head; a candidate's score is ``user . (W_t e_item) + b_item``
(``target.w`` is body)."""
from __future__ import annotations

import torch

from devices.backbones.registry import Backbone, register
from devices.backbones.layers import SHARED_GRU_IN, _gather, head, score

HEAD_KEYS = ("head.w1", "head.b1", "head.w2", "head.b2")  # user tower of GRU4Rec and SASRec


def tower(d: int) -> dict[str, tuple[int, ...]]:
    """Target transform + user tower shared by GRU4Rec and SASRec."""
    return {"target.w": (d, d), "head.w1": (d, d), "head.b1": (d,), "head.w2": (d, d), "head.b2": (d,)}


def encode(params: dict[str, torch.Tensor], windows: torch.Tensor) -> torch.Tensor:
    """GRU4Rec body: windows (M, N, L) item ids (PAD on the left) -> hidden state (M, N, d)."""
    _, n, L = windows.shape
    w_ih, w_hh, b = params["gru.w_ih"], params["gru.w_hh"], params["gru.b"].unsqueeze(1)
    if SHARED_GRU_IN in params:  # every item's input projection, computed once (``shared_tables``)
        gi_all = _gather(params[SHARED_GRU_IN], windows)  # the bias is in the table
        m, d = gi_all.shape[0], w_hh.shape[1]
    else:
        x = _gather(params["item_emb"], windows)  # (M, N, L, d)
        m, d = x.shape[0], x.shape[-1]
        # -1: the GRU weights may hold more models than the window's table (M = 1 broadcasts)
        gi_all = torch.matmul(x.reshape(m, n * L, d), w_ih).reshape(-1, n, L, 3 * d) + b.unsqueeze(2)
    valid = windows >= 0
    padded = valid.logical_not().flatten(0, 1).any(0).tolist()  # steps where some window has PAD
    masks = valid.unsqueeze(-1).unbind(2)
    h = gi_all.new_zeros(m, n, d)
    # unbind, not gi_all[:, :, t]: each select's backward would zero-fill a full-size grad
    steps = gi_all.unbind(2)
    for t in range(L):
        i_rz, i_n = steps[t].split([2 * d, d], -1)  # split, not slices: no zero-filled grads
        h_rz, h_n = torch.matmul(h, w_hh).split([2 * d, d], -1)
        r, z = torch.sigmoid(i_rz + h_rz).chunk(2, -1)  # the r and z gates in one call
        c = torch.tanh(i_n + r * h_n)
        h_new = (1 - z) * c + z * h
        # a PAD step leaves h as it was (only the first steps of short windows have one)
        h = torch.where(masks[t], h_new, h) if padded[t] else h_new
    return h


def logits(params: dict[str, torch.Tensor], windows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    return score(params, head(params, encode(params, windows)), candidates)


register(Backbone(
    name="gru4rec", marker="gru.w_ih", head_keys=HEAD_KEYS, logits=logits, body=encode,
    shapes=lambda spec: {"gru.w_ih": (spec.dim, 3 * spec.dim), "gru.w_hh": (spec.dim, 3 * spec.dim),
                         "gru.b": (3 * spec.dim,), **tower(spec.dim)},
))
