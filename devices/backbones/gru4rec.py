"""GRU4Rec: a GRU over the last L items (``gru.*``) is the body; a two-layer d x d user
tower (``head.*``) the head; a candidate's score is ``user . (W_t e_item) + b_item``
(``target.w`` is body)."""
from __future__ import annotations

import torch

from devices.backbones.registry import Backbone, register
from devices.backbones.layers import SHARED_GRU_IN, _gather, head, score, shortcuts

HEAD_KEYS = ("head.w1", "head.b1", "head.w2", "head.b2")  # user tower of GRU4Rec and SASRec


def tower(d: int) -> dict[str, tuple[int, ...]]:
    """Target transform + user tower shared by GRU4Rec and SASRec."""
    return {"target.w": (d, d), "head.w1": (d, d), "head.b1": (d,), "head.w2": (d, d), "head.b2": (d,)}


def encode(params: dict[str, torch.Tensor], windows: torch.Tensor) -> torch.Tensor:
    """GRU4Rec body: windows (M, N, L) item ids (PAD on the left) -> hidden state (M, N, d)."""
    _, n, L = windows.shape
    w_ih, w_hh, b = params["gru.w_ih"], params["gru.w_hh"], params["gru.b"].unsqueeze(1)
    if shortcuts() and torch.is_grad_enabled() and SHARED_GRU_IN not in params and _Recurrence.fits(params, windows):
        return _Recurrence.encode(params, windows)  # training: the backward written out
    if SHARED_GRU_IN in params and not torch.is_grad_enabled() and params["gru.w_hh"].shape[0] == 1:
        h = _encode_scoring(params[SHARED_GRU_IN][0], params["gru.w_hh"][0], windows)
        if h is not None:
            return h
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


def _tanh_(x: torch.Tensor) -> torch.Tensor:
    """tanh in place, as 2 sigmoid(2x) - 1: within ~1.2e-7 of ``torch.tanh`` (float32
    rounding near 0), and about 3x faster on CPU (torch 2.13: 52 against 179 us for
    2048 x 32)."""
    return x.mul_(2.0).sigmoid_().mul_(2.0).sub_(1.0)


def _encode_scoring(table: torch.Tensor, w_hh: torch.Tensor, windows: torch.Tensor) -> torch.Tensor | None:
    """``encode`` for scoring with one shared model, without gradients: the same recurrence
    with less work per step (about 1.5x faster; prequential scoring of a large fleet is
    mostly this). ``table`` is the model's every-item input projection (V, 3d) and
    ``w_hh`` its (d, 3d) hidden weights. Returns None, for ``encode``'s general loop, if a
    window has a PAD after an item, or if ``table`` or ``w_hh`` hold NaN or Inf: skipping a
    product with h = 0 would skip 0 x Inf = NaN, and a non-finite model must not score
    finite where the general loop does not.

    - Windows are left-padded, and a PAD step leaves h = 0. Rows are taken in the order of
      their PAD counts, so at step t the rows that have begun are a prefix; the others
      keep h = 0 without a masked select.
    - Until a step where some row had begun before, h is 0: that step's hidden matmul is
      skipped (what it would add is exactly 0).
    - Each step's input projections are looked up step-major, so every step reads one
      contiguous block; tanh is ``_tanh_``.
    """
    lead_shape, L = windows.shape[:-1], windows.shape[-1]
    w = windows.reshape(-1, L)
    n, d = w.shape[0], w_hh.shape[0]
    valid = w >= 0
    lead = (valid.cumsum(1) == 0).sum(1)  # leading PADs
    if not torch.equal(lead, L - valid.sum(1)) or not (torch.isfinite(w_hh).all() and torch.isfinite(table).all()):
        return None
    order = None
    if n > 1 and bool((lead[1:] < lead[:-1]).any()):
        order = torch.argsort(lead, stable=True)
        w, lead = w[order], lead[order]
    begun = torch.searchsorted(lead, torch.arange(L), right=True).tolist()  # rows begun by step t
    gi = table.index_select(0, w.T.clamp(min=0).reshape(-1)).reshape(L, n, 3 * d)
    h = gi.new_zeros(n, d)
    before = 0  # rows begun before this step
    for t in range(L):
        m = begun[t]
        if m == 0:
            continue
        g = gi[t, :m]
        if before == 0:  # h = 0 for every row: h W_hh = 0
            rz = g[:, : 2 * d].sigmoid()
            c = _tanh_(g[:, 2 * d :].clone())
            torch.addcmul(c, rz[:, d:], c, value=-1.0, out=h[:m])  # (1 - z) c + z 0
        else:
            hh = h[:m]
            hw = torch.mm(hh, w_hh)
            rz = torch.add(g[:, : 2 * d], hw[:, : 2 * d]).sigmoid_()
            c = _tanh_(torch.mul(rz[:, :d], hw[:, 2 * d :]).add_(g[:, 2 * d :]))
            torch.addcmul(c, rz[:, d:], hh - c, out=hh)  # (1 - z) c + z h, in place of h's rows
        before = m
    if order is not None:
        h = torch.empty_like(h).index_copy_(0, order, h)
    return h.reshape(*lead_shape, d)


class _Recurrence(torch.autograd.Function):
    """``encode`` for training: the same function, with the recurrence's backward written out.

    Autograd's backward of the loop in ``encode`` runs a dozen small kernels per step
    (split/chunk gradients are concatenated, the broadcast bias is summed, w_hh's gradient
    is one small batched matmul per step). Here each step's gate gradients are written
    straight into step-major buffers and w_hh's gradient is one batched matmul over all
    steps: the same FLOPs, in fewer passes over memory. The input projections are looked
    up step-major too ((L, M, N, 3d): every step reads one contiguous block), and with
    per-device (local) item tables of fewer rows than window positions the table is
    projected once and its rows looked up. Outputs and gradients agree with autograd
    through ``encode``'s loop to float32 rounding (``tests/test_models.py``). Used under
    ``layers.training_shortcuts`` only (device training, ``models.sgd_train``).
    """

    @staticmethod
    def fits(params: dict[str, torch.Tensor], windows: torch.Tensor) -> bool:
        """One model per window batch (M equal everywhere) and w_hh trained."""
        m = windows.shape[0]
        return (params["gru.w_hh"].requires_grad and params["gru.w_hh"].shape[0] == m
                and params["gru.w_ih"].shape[0] == m and params["item_emb"].shape[0] == m)

    @staticmethod
    def encode(params: dict[str, torch.Tensor], windows: torch.Tensor) -> torch.Tensor:
        m, n, L = windows.shape
        emb, w_ih, b = params["item_emb"], params["gru.w_ih"], params["gru.b"].unsqueeze(1)
        v = emb.shape[1]
        steps = windows.permute(2, 0, 1)  # (L, M, N)
        rows = (steps.clamp(min=0) + torch.arange(m).reshape(1, m, 1) * v).reshape(-1)
        if v < n * L:  # project the table once, then look its rows up
            gi = (torch.matmul(emb, w_ih) + b).reshape(m * v, -1).index_select(0, rows).reshape(L, m, n, -1)
        else:  # project each looked-up row
            gi = torch.matmul(emb.reshape(m * v, -1).index_select(0, rows).reshape(L, m, n, -1), w_ih) + b
        valid = steps >= 0
        padded = valid.logical_not().flatten(1).any(1).tolist()
        return _Recurrence.apply(gi, params["gru.w_hh"], valid.unsqueeze(-1), padded)

    @staticmethod
    def forward(ctx, gi, w_hh, masks, padded):
        L, m, n, d3 = gi.shape
        d = d3 // 3
        h = gi.new_zeros(m, n, d)
        hs, rzs, cs, hns = [], [], [], []
        w = w_hh.transpose(1, 2).contiguous().transpose(1, 2)  # MKL's faster layout here
        for t in range(L):
            hs.append(h)
            i_rz, i_n = gi[t].split([2 * d, d], -1)
            h_rz, h_n = torch.matmul(h, w).split([2 * d, d], -1)
            rz = torch.sigmoid(i_rz + h_rz)
            r, z = rz.chunk(2, -1)
            c = torch.tanh(i_n + r * h_n)
            h_new = (1 - z) * c + z * h
            h = torch.where(masks[t], h_new, h) if padded[t] else h_new
            rzs.append(rz), cs.append(c), hns.append(h_n)
        ctx.save_for_backward(w_hh, masks)
        ctx.steps, ctx.padded = (hs, rzs, cs, hns), padded
        return h

    @staticmethod
    def backward(ctx, dh):
        w_hh, masks = ctx.saved_tensors
        hs, rzs, cs, hns = ctx.steps
        L, (m, n, d) = len(hs), hs[0].shape
        dgi = dh.new_empty(L, m, n, 3 * d)  # d(loss)/d(gi): step-major, like gi
        dgh = dh.new_empty(m, L, n, 3 * d)  # d(loss)/d(h @ w_hh): model-major, for dw
        w_t = w_hh.transpose(1, 2)
        for t in reversed(range(L)):
            rz, c, h, h_n = rzs[t], cs[t], hs[t], hns[t]
            r, z = rz.chunk(2, -1)
            if padded := ctx.padded[t]:  # a PAD step passed h through unchanged
                d_new = torch.where(masks[t], dh, 0.0)
            else:
                d_new = dh
            d_pre_n = d_new * (1 - z) * (1 - c * c)  # through c = tanh(i_n + r h_n)
            g, gh = dgi[t], dgh[:, t]
            torch.mul(d_pre_n, h_n, out=g[..., :d])  # d/dr
            torch.mul(d_new, h - c, out=g[..., d:2 * d])  # d/dz
            g[..., :2 * d].mul_(rz * (1 - rz))  # through the sigmoids (mul_: `*=` would copy back)
            g[..., 2 * d:] = d_pre_n
            gh[..., :2 * d] = g[..., :2 * d]
            torch.mul(d_pre_n, r, out=gh[..., 2 * d:])
            if t == 0:
                break  # h_0 is the zero state: nothing to pass on
            dh_prev = d_new * z + torch.matmul(gh, w_t)
            dh = dh_prev + (dh - d_new) if padded else dh_prev
        dw = None
        if ctx.needs_input_grad[1]:  # sum over steps of h_t^T dgh_t: one batched matmul
            h_all = torch.stack(hs, 1).reshape(m, L * n, d)
            dw = torch.matmul(h_all.transpose(1, 2), dgh.reshape(m, L * n, 3 * d))
        return (dgi if ctx.needs_input_grad[0] else None), dw, None, None


def logits(params: dict[str, torch.Tensor], windows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    return score(params, head(params, encode(params, windows)), candidates)


register(Backbone(
    name="gru4rec", marker="gru.w_ih", head_keys=HEAD_KEYS, logits=logits, body=encode,
    shapes=lambda spec: {"gru.w_ih": (spec.dim, 3 * spec.dim), "gru.w_hh": (spec.dim, 3 * spec.dim),
                         "gru.b": (3 * spec.dim,), **tower(spec.dim)},
))
