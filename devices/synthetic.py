"""The embedded default fleet: synthetic users whose item tastes drift over the rounds.

Generative model (one user = one device):

- Items have latent factors ``v_i ~ N(0, 1/d)`` per coordinate (``d = latent_dim``) and a
  popularity logit ``-popularity_zipf * log(rank_i)`` for a random rank permutation.
- A user's taste in period ``p`` (0 = history, ``1..n_rounds`` = rounds) is a vector
  ``u_p`` with ``N(0, 1)`` coordinates, so ``u_p . v_i`` has unit spread over items and
  ``taste_strength`` is the spread of the taste logit next to the popularity logit.
- **Taste departure.** The history taste is ``u_0 = sqrt(1 - δ_u²) c + δ_u e_u``: a crowd
  taste ``c`` shared by everyone and the user's own ``e_u`` (both ``N(0, 1)``, so ``u_0``
  keeps ``N(0, 1)`` coordinates). ``δ_u`` is how far the user departs from the crowd
  (0: the crowd's taste, 1: a taste of its own, uncorrelated with anyone's), linear in
  the user's activity rank: ``taste_departure_head`` for the most active user,
  ``taste_departure_tail`` for the least. Both default to 1 (every taste its own, the
  fleet as before the setting existed). ``taste_departure_tail > taste_departure_head``
  is DCCL's premise: the long tail departs from what the crowd's data teaches the cloud.
- In period ``p`` the user makes ``Poisson(rate_u * period_days)`` interactions (at least 1
  in history), items i.i.d. from ``softmax(taste_strength * u_p . v + popularity logit)``,
  times uniform in the period. ``rate_u`` is lognormal with mean
  ``mean_daily_interactions``: a few heavy users, a long tail of light ones.
- Drift of ``u_p`` across rounds: ``none`` constant; ``gradual`` a random walk whose step has
  norm ~ ``drift_rate`` times the taste norm, projected back to the user's taste norm (the
  direction drifts, the strength of taste does not; the realised move per round is
  ~ ``drift_rate * sqrt(1 - 1/d) / sqrt(1 + drift_rate**2)`` of the norm, the radial part of
  the step being projected away); ``sudden`` at each round in
  ``drift_rounds`` a seeded random ``drift_fraction`` of users jump to a fresh taste;
  ``recurring`` rounds alternate between taste A (the history taste) and an independent
  taste B, ``drift_period`` rounds each, starting with A.
"""
from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from threadpoolctl import threadpool_limits

from devices.data import MAX_ROUNDS, DataSource, DriftEvent, Interactions, Timeline
from devices.errors import ConfigError

DRIFT_KINDS = ("none", "gradual", "sudden", "recurring")

_SYNTH_TAG = int.from_bytes(b"synthetic", "big")
# Cells (rows x items) per chunk of the item sampler: bounds its work arrays to ~16 MB.
_SAMPLER_CELLS = 1 << 22
# Rows a chunk needs for the item-major CDF (``_sample_items``) to beat a row-wise cumsum.
_ITEM_MAJOR_ROWS = 1024
# Threads drawing chunks at once (at most the CPUs): the draws are the same on any number.
_SAMPLER_THREADS = 4

# Upper bounds of the size settings (README, "[data] synthetic"): generous for a 100M-device
# fleet, small enough that a typo (1e12) is a config error, not a numpy allocation failure
# or numpy's Poisson limit ("lam value too large") in the middle of a run. Item ids are
# int32 (``Interactions.items``); each user's tastes are (n_rounds + 1) x latent_dim floats.
MAX_DEVICES = 100_000_000
MAX_ITEMS = 10_000_000
MAX_LATENT_DIM = 1024
MAX_DAILY_INTERACTIONS = 10_000.0
MAX_HISTORY_DAYS = 36_500.0  # a century
MIN_ROUND_HOURS = 1 / 60  # a minute: shorter rounds hold no interactions to score
MAX_ROUND_HOURS = 8_760.0  # a year


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def _is_real(x: object) -> bool:
    return (_is_int(x) or isinstance(x, (float, np.floating))) and math.isfinite(float(x))


@dataclass(frozen=True)
class SyntheticConfig:
    """Size, behaviour and drift schedule of the synthetic fleet (see the module docstring)."""

    n_devices: int = 2000
    n_items: int = 1000
    latent_dim: int = 16
    popularity_zipf: float = 1.1
    taste_strength: float = 3.0
    mean_daily_interactions: float = 2.0
    activity_sigma: float = 1.2
    history_days: float = 14.0
    round_hours: float = 4.0
    n_rounds: int = 10
    drift: str = "gradual"
    drift_rate: float = 0.15
    drift_rounds: tuple[int, ...] = (5,)
    drift_fraction: float = 0.5
    drift_period: int = 4
    start_hour: float = 0.0
    taste_departure_head: float = 1.0  # δ of the most active user (module docstring)
    taste_departure_tail: float = 1.0  # δ of the least active user; linear in activity rank between

    def __post_init__(self) -> None:
        k = "data."
        for name in ("n_devices", "n_items", "latent_dim", "n_rounds", "drift_period"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise ConfigError(k + name, v, "an integer >= 1")
        for name, most in (("n_devices", MAX_DEVICES), ("n_items", MAX_ITEMS), ("latent_dim", MAX_LATENT_DIM),
                           ("n_rounds", MAX_ROUNDS)):
            if getattr(self, name) > most:
                raise ConfigError(k + name, getattr(self, name), f"an integer from 1 to {most:,}")
        for name, most in (("mean_daily_interactions", MAX_DAILY_INTERACTIONS), ("history_days", MAX_HISTORY_DAYS)):
            v = getattr(self, name)
            if not _is_real(v) or not 0 < v <= most:
                raise ConfigError(k + name, v, f"a number > 0 and <= {most:,g}")
        if not _is_real(self.round_hours) or not MIN_ROUND_HOURS <= self.round_hours <= MAX_ROUND_HOURS:
            raise ConfigError(k + "round_hours", self.round_hours,
                              f"a number of hours from 1/60 (a minute) to {MAX_ROUND_HOURS:,g} (a year)")
        for name in ("popularity_zipf", "taste_strength", "drift_rate"):
            v = getattr(self, name)
            if not _is_real(v) or v < 0:
                raise ConfigError(k + name, v, "a number >= 0")
        if not _is_real(self.activity_sigma) or not 0 <= self.activity_sigma <= 5:
            raise ConfigError(k + "activity_sigma", self.activity_sigma, "a lognormal sigma in [0, 5]")
        if self.drift not in DRIFT_KINDS:
            raise ConfigError(k + "drift", self.drift, "one of " + "|".join(DRIFT_KINDS))
        if not _is_real(self.drift_fraction) or not 0 <= self.drift_fraction <= 1:
            raise ConfigError(k + "drift_fraction", self.drift_fraction, "a fraction in [0, 1]")
        for name in ("taste_departure_head", "taste_departure_tail"):
            v = getattr(self, name)
            if not _is_real(v) or not 0 <= v <= 1:
                raise ConfigError(k + name, v, "a number in [0, 1] (0: the crowd's taste, 1: a taste of its own)")
        if not _is_real(self.start_hour) or not 0 <= self.start_hour < 24:
            raise ConfigError(k + "start_hour", self.start_hour, "a UTC hour in [0, 24)")
        rounds = self.drift_rounds
        allowed = f"a list of round numbers in 1..n_rounds ({self.n_rounds})"
        if isinstance(rounds, (str, bytes)) or not hasattr(rounds, "__iter__"):
            raise ConfigError(k + "drift_rounds", rounds, allowed)
        rounds = tuple(rounds)
        if not all(_is_int(r) for r in rounds):
            raise ConfigError(k + "drift_rounds", self.drift_rounds, allowed)
        # Only a sudden schedule uses the rounds; checking their range otherwise would make
        # e.g. a 3-round "none" run fail on the default (5,).
        if self.drift == "sudden" and not all(1 <= r <= self.n_rounds for r in rounds):
            raise ConfigError(k + "drift_rounds", self.drift_rounds, allowed)
        object.__setattr__(self, "drift_rounds", tuple(int(r) for r in rounds))


@dataclass
class SyntheticFleet:
    """A generated fleet: streams, timeline, and the ground truth that produced them."""

    interactions: Interactions
    timeline: Timeline
    tastes: np.ndarray  # float32 (n_rounds + 1, n_devices, latent_dim); period 0 = history
    item_factors: np.ndarray  # float32 (n_items, latent_dim)
    item_popularity_logit: np.ndarray  # float64 (n_items,)
    activity_rate: np.ndarray  # float64 (n_devices,) expected interactions per day


def taste_departure(cfg: SyntheticConfig, rate: np.ndarray) -> np.ndarray:
    """δ_u of every user: ``taste_departure_head`` for the most active (highest ``rate``),
    ``taste_departure_tail`` for the least, linear in activity rank (ties by user id)."""
    n = len(rate)
    q = np.empty(n)
    q[np.argsort(rate, kind="stable")] = np.arange(n) / max(n - 1, 1)  # 0 least active .. 1 most
    return cfg.taste_departure_tail + (cfg.taste_departure_head - cfg.taste_departure_tail) * q


def _taste_schedule(
    cfg: SyntheticConfig, rng_taste: np.random.Generator, rng_drift: np.random.Generator,
    rng_crowd: np.random.Generator, rate: np.ndarray,
) -> tuple[np.ndarray, tuple[DriftEvent, ...]]:
    """Tastes of every user in every period, and the drift events that changed them."""
    n, d, R = cfg.n_devices, cfg.latent_dim, cfg.n_rounds
    a = rng_taste.standard_normal((n, d))
    if cfg.taste_departure_head < 1 or cfg.taste_departure_tail < 1:  # else exactly as before the setting
        delta = taste_departure(cfg, rate)[:, None]
        a = np.sqrt(1 - delta**2) * rng_crowd.standard_normal(d)[None, :] + delta * a
    out = np.empty((R + 1, n, d), dtype=np.float32)
    out[0] = a
    events: list[DriftEvent] = []
    if cfg.drift == "none":
        out[1:] = out[0]
    elif cfg.drift == "gradual":
        norm = np.linalg.norm(a, axis=1, keepdims=True)
        cur = a
        for r in range(1, R + 1):
            step = rng_drift.standard_normal((n, d)) * (cfg.drift_rate * norm / math.sqrt(d))
            cur = cur + step
            cur *= norm / np.maximum(np.linalg.norm(cur, axis=1, keepdims=True), 1e-12)
            out[r] = cur
        events.append(DriftEvent(1, "gradual", 1.0, f"random-walk step {cfg.drift_rate:g} x taste norm per round"))
    elif cfg.drift == "sudden":
        k = int(round(cfg.drift_fraction * n))
        jump_rounds = sorted(set(cfg.drift_rounds))
        cur = out[0].copy()
        for r in range(1, R + 1):
            if r in jump_rounds:
                who = rng_drift.choice(n, size=k, replace=False)
                cur[who] = rng_drift.standard_normal((k, d))
            out[r] = cur
        events += [
            DriftEvent(r, "sudden", k / n, f"{k} of {n} users jump to a fresh taste") for r in jump_rounds
        ]
    else:  # recurring
        b = rng_drift.standard_normal((n, d)).astype(np.float32)
        for r in range(1, R + 1):
            out[r] = out[0] if ((r - 1) // cfg.drift_period) % 2 == 0 else b
        for r in range(cfg.drift_period + 1, R + 1, cfg.drift_period):
            to = "B" if ((r - 1) // cfg.drift_period) % 2 else "A"
            events.append(DriftEvent(r, "recurring", 1.0, f"all users switch to taste {to}"))
    return out, tuple(events)


def _sample_items(
    row_taste: np.ndarray,
    row_counts: np.ndarray,
    item_factors: np.ndarray,
    pop_logit: np.ndarray,
    strength: float,
    u: np.ndarray,
) -> np.ndarray:
    """Inverse-CDF item draws: ``row_counts[j]`` items for row ``j`` from its softmax.

    ``u`` holds one uniform per draw, rows' draws contiguous and in row order.
    """
    n_items = item_factors.shape[0]
    items = np.empty(len(u), dtype=np.int32)
    chunk = max(1, _SAMPLER_CELLS // n_items)
    starts = np.concatenate([[0], np.cumsum(row_counts)])
    vt = (strength * item_factors.T).astype(np.float32)
    pop = pop_logit.astype(np.float32)
    n_steps = max(1, math.ceil(math.log2(n_items)))
    def draw(lo: int) -> None:
        hi = min(lo + chunk, len(row_counts))
        m = hi - lo
        # The CDF is a float32 running sum over the items (the fastest numpy offers; its
        # ~1e-5 relative error is far below sampling noise). With many rows a chunk is laid
        # out item-major (items x rows): each item's sums are then one vector add across the
        # rows, where a row-wise cumsum adds one element at a time -- the same sums, 2-3x
        # sooner. A large catalogue leaves few rows a chunk: there the row-wise cumsum.
        # (The logits' product is taken transposed; with this machine's OpenBLAS each
        # logit's 16-term sum is the same either way, so the fleet was bit-identical to the
        # row-major code's. Another BLAS may round a logit differently, as it may anyway.)
        if m >= _ITEM_MAJOR_ROWS:
            logits = vt.T @ row_taste[lo:hi].T
            logits += pop[:, None]
            logits -= logits.max(axis=0, keepdims=True)
            cdf = np.exp(logits, out=logits)
            for k in range(1, n_items):
                np.add(cdf[k - 1], cdf[k], out=cdf[k])
            row_step, item_step = 1, m
        else:
            logits = row_taste[lo:hi] @ vt + pop
            logits -= logits.max(axis=1, keepdims=True)
            cdf = np.cumsum(np.exp(logits, out=logits), axis=1, out=logits)
            row_step, item_step = n_items, 1
        cdf = cdf.ravel()
        a, b = starts[lo], starts[hi]
        base = np.repeat(np.arange(m, dtype=np.int64) * row_step, row_counts[lo:hi])
        q = u[a:b].astype(np.float32) * cdf[base + (n_items - 1) * item_step]
        # Vectorised binary search for the first item whose CDF exceeds q, all draws at once.
        left = np.zeros(b - a, dtype=np.int64)
        right = np.full(b - a, n_items - 1, dtype=np.int64)
        for _ in range(n_steps):
            mid = (left + right) >> 1
            above = cdf[base + mid * item_step] > q
            right = np.where(above, mid, right)
            left = np.where(above, left, mid + 1)
        items[a:b] = np.minimum(left, n_items - 1)

    # Chunks write disjoint slices and numpy releases the GIL in their heavy loops: on a
    # few threads the draws are the same, sooner. Each chunk's matrix product runs in its
    # own thread (threadpoolctl holds BLAS to one thread): a BLAS thread pool under every
    # chunk would oversubscribe the cores, and OpenBLAS stops its pool before any fork,
    # which hangs a product in flight when another thread forks (Ray starting beside the
    # build: ``devices.pool.HostProcesses``).
    chunks = range(0, len(row_counts), chunk)
    workers = min(len(chunks), os.cpu_count() or 1, _SAMPLER_THREADS)
    with threadpool_limits(1, user_api="blas"):
        if workers <= 1:
            for lo in chunks:
                draw(lo)
        else:
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(draw, chunks))
    return items


def generate(cfg: SyntheticConfig = SyntheticConfig(), seed: int = 0) -> SyntheticFleet:
    """Generate the synthetic fleet for ``cfg``; the same ``(cfg, seed)`` gives the same fleet."""
    n, n_items, d, R = cfg.n_devices, cfg.n_items, cfg.latent_dim, cfg.n_rounds
    # spawn(8)'s first 7 streams are spawn(7)'s: the crowd taste's stream changes no other draw
    streams = np.random.SeedSequence([seed, _SYNTH_TAG]).spawn(8)
    rng_items, rng_pop, rng_taste, rng_drift, rng_count, rng_time, rng_choice, rng_crowd = (
        np.random.default_rng(s) for s in streams
    )
    item_factors = rng_items.normal(0.0, 1.0 / math.sqrt(d), (n_items, d)).astype(np.float32)
    rank = rng_pop.permutation(n_items) + 1
    pop_logit = -cfg.popularity_zipf * np.log(rank)
    sigma = cfg.activity_sigma
    rate = cfg.mean_daily_interactions * np.exp(sigma * rng_count.standard_normal(n) - sigma**2 / 2)
    tastes, events = _taste_schedule(cfg, rng_taste, rng_drift, rng_crowd, rate)

    history_end = cfg.history_days * 86400.0
    round_s = cfg.round_hours * 3600.0
    period_days = np.array([cfg.history_days] + [cfg.round_hours / 24.0] * R)
    period_start = np.concatenate([[0.0], history_end + round_s * np.arange(R)])
    period_len = np.concatenate([[history_end], np.full(R, round_s)])
    counts = rng_count.poisson(rate[:, None] * period_days[None, :])  # (n, R + 1)
    counts[:, 0] = np.maximum(counts[:, 0], 1)

    # Rows = (user, period) pairs with draws, user-major then period: since periods are
    # disjoint and ordered in time, sorting times within each row sorts each user's stream.
    row_user, row_period = np.nonzero(counts)
    row_counts = counts[row_user, row_period]
    n_total = int(row_counts.sum())
    row_of = np.repeat(np.arange(len(row_counts), dtype=np.float64), row_counts)
    # Items within a row are i.i.d. and independent of times, so sorting the times alone
    # (not the (time, item) pairs) keeps the joint distribution. The keys are already in
    # row order, so a stable (merging) sort does far less work than an unstable one, with
    # the same result; in-place steps and per-row values repeated (not per-draw lookups)
    # give the same times with fewer passes over the ~30M draws of a 1M-device fleet.
    u_time = rng_time.random(n_total)
    u_time += row_of
    u_time.sort(kind="stable")
    u_time -= row_of
    del row_of
    np.clip(u_time, 0.0, 1.0, out=u_time)
    times = np.repeat(period_len[row_period], row_counts)
    times *= u_time
    times += np.repeat(period_start[row_period], row_counts)
    last = np.nextafter(period_start + period_len, -np.inf)  # each period's last time before its end
    np.minimum(times, np.repeat(last[row_period], row_counts), out=times)
    del u_time

    # Consecutive periods in which a user's taste is unchanged share one item distribution;
    # drawing their items as one segment saves the per-row softmax (the bulk of the cost).
    new_segment = np.ones((n, R + 1), dtype=bool)
    new_segment[:, 1:] = np.any(tastes[1:] != tastes[:-1], axis=2).T
    seg_id = np.cumsum(new_segment.ravel()) - 1
    seg_counts = np.bincount(seg_id, weights=counts.ravel()).astype(np.int64)
    seg_user, seg_period = np.nonzero(new_segment)
    keep = seg_counts > 0
    items = _sample_items(
        tastes[seg_period[keep], seg_user[keep]], seg_counts[keep], item_factors, pop_logit,
        cfg.taste_strength, rng_choice.random(n_total),
    )
    indptr = np.concatenate([[0], np.cumsum(counts.sum(axis=1))])
    interactions = Interactions(n_users=n, n_items=n_items, indptr=indptr, items=items, times=times)
    timeline = Timeline(
        history_end=history_end,
        round_seconds=round_s,
        n_rounds=R,
        start_clock=cfg.start_hour * 3600.0,
        drift_events=events,
    )
    return SyntheticFleet(interactions, timeline, tastes, item_factors, pop_logit, rate)


if __name__ == "__main__":
    for kind in DRIFT_KINDS:
        for n in (2_000, 100_000):
            t0 = time.perf_counter()
            fleet = generate(SyntheticConfig(n_devices=n, drift=kind), seed=0)
            dt = time.perf_counter() - t0
            print(
                f"generate(drift={kind:<9}, n_devices={n:>7,}): {dt:.3f} s, "
                f"{len(fleet.interactions.items):,} interactions"
            )


def load_source(cfg: SyntheticConfig, seed: int) -> tuple[Interactions, Timeline]:
    fleet = generate(cfg, seed)
    return fleet.interactions, fleet.timeline


SOURCE = DataSource("synthetic", SyntheticConfig, load_source, reads_files=False)
