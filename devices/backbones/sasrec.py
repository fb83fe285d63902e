"""SASRec: item + learned position embeddings, one post-LayerNorm Transformer encoder layer
(``SAS_HEADS`` heads, ReLU FFN ``SAS_FFN``; ``sas.*``); the last position's output goes
through the same user tower and scoring as GRU4Rec."""
from __future__ import annotations

import torch

from devices.backbones.registry import Backbone, register
from devices.backbones.gru4rec import HEAD_KEYS, tower
from devices.backbones.layers import MASKED, _gather, _layer_norm, _linear, head, score
from devices.errors import ConfigError

SAS_HEADS, SAS_FFN = 4, 128


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


def logits(params: dict[str, torch.Tensor], windows: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    return score(params, head(params, sas_encode(params, windows)), candidates)


def shapes(spec) -> dict[str, tuple[int, ...]]:
    d = spec.dim
    return {"sas.pos": (spec.window, d), "sas.w_qkv": (d, 3 * d), "sas.b_qkv": (3 * d,), "sas.w_o": (d, d),
            "sas.b_o": (d,), "sas.ln1.w": (d,), "sas.ln1.b": (d,), "sas.w_ff1": (d, SAS_FFN), "sas.b_ff1": (SAS_FFN,),
            "sas.w_ff2": (SAS_FFN, d), "sas.b_ff2": (d,), "sas.ln2.w": (d,), "sas.ln2.b": (d,), **tower(d)}


def check(spec) -> None:
    if spec.dim % SAS_HEADS:
        raise ConfigError("model.dim", spec.dim, f"a multiple of {SAS_HEADS} for sasrec ({SAS_HEADS} heads)")


register(Backbone(name="sasrec", marker="sas.w_qkv", head_keys=HEAD_KEYS, logits=logits, body=sas_encode,
                  shapes=shapes, check=check))
