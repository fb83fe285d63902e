"""MetaPatch's shared patch parameters Theta (cloud side): their seeded init, their
learning on the history data before round 1, and the map from a metapatch phi to the
patch (which devices run too). See ``strategies.metapatch`` for the method.
"""
from __future__ import annotations

import numpy as np
import torch

from devices import models
from devices.samples import SampleBuilder, stream_key

THETA_TAG = 11
THETA_BLOCK_SAMPLES = 1 << 16  # history samples built and encoded at once while learning Theta (~0.4 GB of work arrays)


def init_theta(spec: models.ModelSpec, layer: str, dim: int, seed: int) -> dict[str, np.ndarray]:
    """Shared patch parameters Theta: small random maps from phi (dim) to W and b."""
    width = models.patch_width(spec, layer)
    rng = np.random.default_rng(np.random.SeedSequence([seed, THETA_TAG]))
    scale = 1.0 / np.sqrt(dim * width)
    return {"theta.w": (rng.standard_normal((dim, width * width)) * scale).astype(np.float32),
            "theta.b": (rng.standard_normal((dim, width)) * scale).astype(np.float32)}


def learn_theta(cloud, layer: str, dim: int, *, epochs: int, lr: float = 0.01, batch_size: int = 512,
                phi_decay: float = 1e-3) -> dict[str, np.ndarray]:
    """Theta <- Adam on BCE over all devices' history samples with the cloud model frozen
    and one free phi per user (+ ``phi_decay`` * |phi|^2), from ``init_theta``. The result
    is rescaled to the init's norm, so the device lr means the same for either Theta.

    Measured (default fleet, seed 0, 10 rounds, encoder patch, lr 0.5, 5 steps): UAUC
    cloud_only .8974, random Theta .8977, learned Theta .8985.
    """
    from strategies.cloud import blocked_samples, check_losses, check_params, history_rows

    key = ("metapatch.theta", layer, dim, epochs, lr, batch_size, phi_decay)
    if key in cloud.cache:  # MetaPatch and MoMoDistill in one run learn the same Theta
        return {k: v.copy() for k, v in cloud.cache[key].items()}
    theta0 = init_theta(cloud.spec, layer, dim, cloud.seed)
    th = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in theta0.items()}
    frozen = {k: torch.from_numpy(np.asarray(v, np.float32))[None] for k, v in cloud.initial.items()}
    phi = torch.zeros(cloud.interactions.n_users, dim, requires_grad=True)
    opt = torch.optim.Adam([*th.values(), phi], lr=lr)
    builder = SampleBuilder(cloud.interactions, cloud.spec.window)
    rows = history_rows(cloud.interactions, cloud.history_end)
    rng = np.random.default_rng(np.random.SeedSequence([cloud.seed, THETA_TAG, 1]))
    losses: list[float] = []
    for epoch in range(epochs):
        total = 0.0
        batches = np.array_split(rng.permutation(len(rows)), max(1, -(-len(rows) // batch_size)))
        # a block of batches at a time: in one pass, a 200,000-device history (5.6M
        # samples) ran out of 24 GB in the frozen body's work arrays; a body output does
        # not depend on the others computed with it
        sample_key = stream_key(cloud.seed, THETA_TAG, epoch)
        for s, slices in blocked_samples(builder, rows, batches, cloud.negatives, sample_key, THETA_BLOCK_SAMPLES):
            win, cand = torch.from_numpy(s.windows), torch.from_numpy(s.candidates)
            with torch.no_grad():
                h = models.body_output(frozen, win[None])
            for idx in slices:
                own = torch.from_numpy(s.owner[idx])
                p = {**frozen, **patch_from_phi(th, phi[own], layer)}  # one patched model per sample
                logits = (models.forward(p, win[idx][:, None], cand[idx][:, None]) if h is None
                          else models.forward_from_body(p, h[0, idx][:, None], cand[idx][:, None]))
                loss = (models.bce_loss(logits, torch.ones(len(own), 1)).mean()
                        + phi_decay * phi[own].pow(2).sum(1).mean())
                opt.zero_grad()
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(own)
        losses.append(total / max(len(rows), 1))
        check_losses(losses, "Θ", "strategies.metapatch.theta_epochs (0 = a fixed random Θ)")
    out = {k: v.detach().numpy() for k, v in th.items()}
    check_params(out, "Θ", "strategies.metapatch.theta_epochs (0 = a fixed random Θ)")
    scale = np.sqrt(sum((v**2).sum() for v in theta0.values()) / max(sum((v**2).sum() for v in out.values()), 1e-12))
    cloud.cache[key] = {k: (v * scale).astype(np.float32) for k, v in out.items()}
    return {k: v.copy() for k, v in cloud.cache[key].items()}


def patch_from_phi(theta: dict[str, torch.Tensor], phi: torch.Tensor, layer: str) -> dict[str, torch.Tensor]:
    """Patch params for each phi (B, k): {patch.<layer>.w: (B, width, width), .b: (B, width)}."""
    width = theta["theta.b"].shape[1]
    w_key, b_key = models.patch_keys(layer)
    return {w_key: (phi @ theta["theta.w"]).reshape(-1, width, width), b_key: phi @ theta["theta.b"]}


def tensors(arrays: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Received arrays as (writable, copied) tensors."""
    return {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
