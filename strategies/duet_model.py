"""DUET's parameter generator, the model: window -> head parameters, batched over windows.

Paper -> code (DUET, Lv et al., WWW'23: the parameter generator and its stabiliser):

- Encoder: z = MLP(GRU(embedded window)) with ``dim(z) = z_dim``. The window is embedded
  with the *body's* ``item_emb`` (shared, trained jointly); the GRU is ``models.encode``
  run on the generator's own weights (``gen.enc.gru.*``, hidden size = the embedding dim,
  as ``models.encode`` ties them), the MLP is ``gen.enc.w1/b1`` (ReLU) then ``gen.enc.w2/b2``.
- Per dynamic (head) layer n with weight key ``wk`` (shape (in, out)) and bias key ``bk``:
  ``e_n = A_n z`` (``gen.<wk>.A``, (e_dim, z_dim)); decoder i of m:
  ``W_n^(i) = reshape(D_n^(i) e_n + d_n^(i))`` (``gen.<wk>.D`` (m, in*out, e_dim) and
  ``gen.<wk>.d0`` (m, in*out)), ``b_n^(i) = C_n^(i) e_n + c_n^(i)`` (``gen.<bk>.C``
  (m, out, e_dim) and ``gen.<bk>.c0`` (m, out)). ``reshape`` is row-major to (in, out).
- Stabiliser: S = W W^T over the flattened candidates, p' = row sums of S,
  p = softmax(p' / tau), W_n = sum_i p_i W_n^(i); the bias has its own S and p.
  Computed without materialising the (N, m, in*out) candidates: p'_i = <W_i, sum_j W_j>
  is a quadratic form in e_n with (m, e_dim, e_dim) coefficients, and the mixture is one
  matmul of [p (x) e_n, p] (N, m*e_dim + m) with the stacked bases. Exact, and it keeps
  10,000 DIN heads at the size of the output.
- ``stabilizer=False`` (ablation): ONE decoder per layer (m is ignored), W_n = D_n e_n + d_n;
  m averaged linear decoders would be one linear decoder anyway.
- ``frozen_bases=True`` (ablation reproducing the authors' code): D, d, C, c keep their
  initial values; A_n, the encoder and the body still train.
- ``generate``: which layers are dynamic. ``"head"`` (default): the backbone's head
  (``ModelSpec.head_keys``; DIN's whole classifier). ``"head+attention"`` (DIN only): DIN's
  activation unit (``din.att.w1/b1/w2/b2``) is generated too, each window getting its own
  attention over its items; those layers then leave the body, as the head does.

Initialisation (our choice): d_n^(i), c_n^(i) = the universal model's head (``head_init``)
plus noise of 1 % of the layer's 1/sqrt(in) scale, D and C small (their product with e_n
starts at a few % of that scale), so DUET starts at the base model with near-uniform p and
every decoder gets gradient. Without ``head_init`` the offsets start from one seeded random
head (N(0, 1/in) weights, zero biases), shared by the m decoders up to the same noise.

Training and retraining are in ``strategies.duet_generator``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from devices import models
from devices.errors import ConfigError

# ``generate`` -> the layers generated beside the head (weight, bias keys of each)
GENERATE: dict[str, tuple[str, ...]] = {"head": (), "head+attention": ("din.att.w1", "din.att.b1", "din.att.w2", "din.att.b2")}
GEN_TAG = int.from_bytes(b"duetgen", "big")  # initialisation of the generator
BASES = ("D", "d0", "C", "c0")  # decoder bases: frozen by ``frozen_bases``
SPREAD = 0.1  # std of D, C entries x sqrt(e_dim), relative to the layer scale 1/sqrt(in)
NOISE = 0.01  # std of the per-decoder noise on d, c, relative to the same scale


@dataclass(frozen=True)
class GeneratorConfig:
    """Generator hyper-parameters (DUET, Lv et al.); see the module docstring for the ablations."""

    z_dim: int = 32
    e_dim: int = 32  # dim of e_n = A_n z (our choice: the embedding dim)
    m: int = 5  # parallel decoders of the stabiliser
    tau: float = 1.0  # softmax temperature of the stabiliser
    stabilizer: bool = True
    frozen_bases: bool = False
    from_scratch: bool = False  # joint training from a fresh init instead of the universal model
    generate: str = "head"  # the dynamic layers: a key of GENERATE

    def __post_init__(self) -> None:
        for key in ("z_dim", "e_dim", "m"):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"strategies.duet.{key}", v, "an integer >= 1")
        t = self.tau
        if isinstance(t, bool) or not isinstance(t, (int, float, np.floating)) or not 0 < t < math.inf:
            raise ConfigError("strategies.duet.tau", t, "a finite number > 0")
        if self.generate not in GENERATE:
            raise ConfigError("strategies.duet.generate", self.generate, f"one of {list(GENERATE)}")
        for key in ("stabilizer", "frozen_bases", "from_scratch"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"strategies.duet.{key}", getattr(self, key), "true or false")

    @property
    def decoders(self) -> int:
        """Decoders per layer actually built: m with the stabiliser, 1 without."""
        return self.m if self.stabilizer else 1


def dynamic_keys(spec: models.ModelSpec, gcfg: GeneratorConfig | None = None) -> tuple[str, ...]:
    """The generated parameters' keys (weight, bias pairs): the head, plus the layers
    ``gcfg.generate`` adds (``ConfigError`` if the backbone has none of them)."""
    extra = GENERATE[gcfg.generate if gcfg is not None else "head"]
    missing = [k for k in extra if k not in spec.shapes()]
    if missing:
        raise ConfigError("strategies.duet.generate", gcfg.generate,
                          f"layers the {spec.backbone} backbone has (it has no {missing[0]}): 'head'")
    return (*spec.head_keys(), *extra)


def head_layers(spec: models.ModelSpec, gcfg: GeneratorConfig | None = None) -> list[tuple[str, str, int, int]]:
    """(weight key, bias key, in, out) of each dynamic layer, in ``dynamic_keys`` order."""
    keys, shapes = dynamic_keys(spec, gcfg), spec.shapes()
    return [(w, b, *shapes[w]) for w, b in zip(keys[::2], keys[1::2])]


def head_nbytes(spec: models.ModelSpec, gcfg: GeneratorConfig | None = None) -> int:
    """Bytes of one generated head in fp32 (what the cloud sends a device per request)."""
    shapes = spec.shapes()
    return int(sum(4 * math.prod(shapes[k]) for k in dynamic_keys(spec, gcfg)))


def is_basis(name: str) -> bool:
    """Whether a generator parameter is a decoder basis (D, d, C, c)."""
    return name.rsplit(".", 1)[-1] in BASES


def init_generator(spec: models.ModelSpec, gcfg: GeneratorConfig, seed: int,
                   head_init: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Fresh generator parameters (float32, no model dim, all named ``gen.*``), seeded."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, GEN_TAG]))
    d, Z, E, m = spec.dim, gcfg.z_dim, gcfg.e_dim, gcfg.decoders

    def normal(shape: tuple[int, ...], std: float) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    g = {"gen.enc.gru.w_ih": normal((d, 3 * d), d**-0.5), "gen.enc.gru.w_hh": normal((d, 3 * d), d**-0.5),
         "gen.enc.gru.b": np.zeros(3 * d, np.float32), "gen.enc.w1": normal((d, d), d**-0.5),
         "gen.enc.b1": np.zeros(d, np.float32), "gen.enc.w2": normal((d, Z), d**-0.5), "gen.enc.b2": np.zeros(Z, np.float32)}
    for wk, bk, i, o in head_layers(spec, gcfg):
        scale = i**-0.5
        w0 = np.asarray(head_init[wk], np.float32) if head_init else normal((i, o), scale)
        b0 = np.asarray(head_init[bk], np.float32) if head_init else np.zeros(o, np.float32)
        g[f"gen.{wk}.A"] = normal((E, Z), Z**-0.5)
        g[f"gen.{wk}.D"] = normal((m, i * o, E), SPREAD * scale * E**-0.5)
        g[f"gen.{wk}.d0"] = (w0.reshape(1, -1) + normal((m, i * o), NOISE * scale)).astype(np.float32)
        g[f"gen.{bk}.C"] = normal((m, o, E), SPREAD * scale * E**-0.5)
        g[f"gen.{bk}.c0"] = (b0.reshape(1, -1) + normal((m, o), NOISE * scale)).astype(np.float32)
    return g


def encode_windows(gen: dict[str, torch.Tensor], body: dict[str, torch.Tensor], windows: torch.Tensor) -> torch.Tensor:
    """Condition vectors z (N, z_dim) of windows (N, L); all-PAD windows give MLP(0)."""
    enc = {"item_emb": body["item_emb"], **{f"gru.{k}": gen[f"gen.enc.gru.{k}"][None] for k in ("w_ih", "w_hh", "b")}}
    h = models.encode(enc, windows[None])[0]
    return torch.relu(h @ gen["gen.enc.w1"] + gen["gen.enc.b1"]) @ gen["gen.enc.w2"] + gen["gen.enc.b2"]


def _decode(e: torch.Tensor, D: torch.Tensor, off: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Stabilised decoder: e (N, E), bases D (m, P, E), off (m, P) -> sum_i p_i W^(i) (N, P), p (N, m)."""
    m, P, E = D.shape
    n = e.shape[0]
    if m == 1:
        return e @ D[0].T + off[0], e.new_ones(n, 1)
    D_sum, off_sum = D.sum(0), off.sum(0)
    # p'_i = <D_i e + off_i, D_sum e + off_sum>: (m, E, E) coefficients instead of (N, m, P) candidates
    quad = torch.einsum("ipe,pf->ief", D, D_sum)
    lin = torch.einsum("ipe,p->ie", D, off_sum) + torch.einsum("pe,ip->ie", D_sum, off)
    row = (torch.einsum("ne,ief->nif", e, quad) * e[:, None]).sum(-1) + e @ lin.T + off @ off_sum
    p = torch.softmax(row / tau, -1)
    mix = torch.cat([(p[:, :, None] * e[:, None]).reshape(n, m * E), p], 1)
    basis = torch.cat([D.transpose(1, 2).reshape(m * E, P), off], 0)
    return mix @ basis, p


def generate_heads(gen: dict[str, torch.Tensor], body: dict[str, torch.Tensor], windows: torch.Tensor,
                   spec: models.ModelSpec, gcfg: GeneratorConfig, return_weights: bool = False) -> dict:
    """Head parameters {head key: (N, *shape)} of N windows (N, L) in one batched pass.

    ``body`` carries the model dim M = 1 (``models.to_torch``); ``gen`` has none. With
    ``return_weights``, also ``"stabilizer_weights"``: {head key: p (N, m)} (weight and bias
    keys each get their own p; (N, 1) of ones without the stabiliser).
    """
    z = encode_windows(gen, body, windows)
    out, weights = {}, {}
    for wk, bk, i, o in head_layers(spec, gcfg):
        e = z @ gen[f"gen.{wk}.A"].T
        w, weights[wk] = _decode(e, gen[f"gen.{wk}.D"], gen[f"gen.{wk}.d0"], gcfg.tau)
        out[wk] = w.reshape(-1, i, o)  # weight, then bias: the order of ``dynamic_keys``
        out[bk], weights[bk] = _decode(e, gen[f"gen.{bk}.C"], gen[f"gen.{bk}.c0"], gcfg.tau)
    if return_weights:
        out["stabilizer_weights"] = weights
    return out


def duet_logits(body: dict[str, torch.Tensor], gen: dict[str, torch.Tensor], windows: torch.Tensor,
                candidates: torch.Tensor, spec: models.ModelSpec, gcfg: GeneratorConfig) -> torch.Tensor:
    """Logits (N, C): each sample scored by the body (M = 1) with the head of its own window."""
    heads = generate_heads(gen, body, windows, spec, gcfg)
    return models.forward({**body, **heads}, windows[:, None], candidates[:, None], spec.backbone)[:, 0]
