"""Hardware, network and availability profiles of a simulated phone fleet.

A fleet is three device tiers (low / mid / high end). Each device gets a sustained training
speed, down- and uplink bandwidth, round-trip time, a time zone, a diurnal online curve and a
per-round failure probability. Profiles are a struct of arrays (``Profiles``) built in one
vectorised, seeded call (``make_profiles``); the functions below turn them into online
draws, failures and simulated seconds for transfers and computation.

Randomness: every draw comes from a generator seeded by ``SeedSequence([seed, tag, ...])``
(tag = what is drawn), never from global state. Online and failure draws are made for the
whole fleet in device-id order, so a device's outcome does not depend on which other devices
are asked about.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from numbers import Real

import numpy as np

from devices.errors import ConfigError

TIERS = ("low", "mid", "high")

# Share of the world's smartphone users per UTC offset (hours), rounded: the Americas,
# Europe/Africa, India, South-East Asia, China and Japan/Korea/Australia. A fleet spread
# over a few populous zones, not uniform longitude, is what shapes real diurnal availability.
DEFAULT_TZ_OFFSETS_H = (-8.0, -7.0, -6.0, -5.0, -3.0, 0.0, 1.0, 2.0, 3.0, 5.5, 7.0, 8.0, 9.0, 10.0)
DEFAULT_TZ_WEIGHTS = (0.04, 0.02, 0.04, 0.06, 0.06, 0.04, 0.12, 0.05, 0.06, 0.15, 0.08, 0.22, 0.04, 0.02)

# Uplink and downlink share the access network (Wi-Fi vs. weak cellular), so their
# within-tier deviations are correlated rather than independent.
UP_DOWN_CORRELATION = 0.8


def _tag(name: bytes) -> int:
    return int.from_bytes(name, "big")


_PROFILE_TAG = _tag(b"profiles")
_ONLINE_TAG = _tag(b"online")
_FAILURE_TAG = _tag(b"failure")


def _is_real(x: object) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and math.isfinite(float(x))


def _real_tuple(key: str, value: object, length: int | None, allowed: str) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
        raise ConfigError(key, value, allowed)
    if (length is not None and len(value) != length) or not all(_is_real(v) for v in value):
        raise ConfigError(key, value, allowed)
    return tuple(float(v) for v in value)


@dataclass(frozen=True)
class ProfileConfig:
    """How device hardware, networks and availability are distributed over the fleet.

    Per-tier tuples are ordered (low, mid, high). Speeds and bandwidths are lognormal
    within a tier around the given medians: ``tier_gflops`` is sustained training speed
    in 1e9 FLOP/s; ``down_mbps``/``up_mbps`` are Mbit/s; ``rtt_ms`` milliseconds.
    Availability follows ``online_trough + (online_peak - online_trough) *
    (1 + cos(2*pi*(local_hour - peak_hour)/24)) / 2``. Each device's per-round failure
    probability is Beta-distributed with mean ``failure_rate`` and concentration
    ``failure_concentration`` (a few flaky devices, most reliable). Time zones are drawn
    from the discrete offsets ``tz_offsets_h`` with probabilities ``tz_weights``.
    """

    tier_fractions: tuple[float, float, float] = (0.3, 0.5, 0.2)
    tier_gflops: tuple[float, float, float] = (2.0, 10.0, 40.0)
    gflops_sigma: float = 0.35
    down_mbps: tuple[float, float, float] = (5.0, 20.0, 60.0)
    up_mbps: tuple[float, float, float] = (1.0, 5.0, 15.0)
    bandwidth_sigma: float = 0.6
    rtt_ms: tuple[float, float, float] = (150.0, 80.0, 40.0)
    rtt_sigma: float = 0.3
    online_peak: float = 0.8
    online_trough: float = 0.15
    peak_hour: float = 21.0
    failure_rate: float = 0.02
    failure_concentration: float = 20.0
    tz_offsets_h: tuple[float, ...] = DEFAULT_TZ_OFFSETS_H
    tz_weights: tuple[float, ...] = DEFAULT_TZ_WEIGHTS

    def __post_init__(self) -> None:
        k = "profiles."
        three = "3 numbers (low, mid, high tier)"
        fr = _real_tuple(k + "tier_fractions", self.tier_fractions, 3, three + " >= 0 summing to 1")
        if min(fr) < 0 or abs(sum(fr) - 1.0) > 1e-6:
            raise ConfigError(k + "tier_fractions", self.tier_fractions, three + " >= 0 summing to 1")
        object.__setattr__(self, "tier_fractions", fr)
        for name in ("tier_gflops", "down_mbps", "up_mbps", "rtt_ms"):
            vals = _real_tuple(k + name, getattr(self, name), 3, three + " > 0")
            if min(vals) <= 0:
                raise ConfigError(k + name, getattr(self, name), three + " > 0")
            object.__setattr__(self, name, vals)
        for name in ("gflops_sigma", "bandwidth_sigma", "rtt_sigma"):
            v = getattr(self, name)
            if not _is_real(v) or not 0 <= v <= 5:
                raise ConfigError(k + name, v, "a lognormal sigma in [0, 5]")
        for name in ("online_peak", "online_trough", "failure_rate"):
            v = getattr(self, name)
            if not _is_real(v) or not 0 <= v <= 1:
                raise ConfigError(k + name, v, "a probability in [0, 1]")
        if self.online_trough > self.online_peak:
            raise ConfigError(
                k + "online_trough", self.online_trough, f"<= online_peak ({self.online_peak})"
            )
        if not _is_real(self.peak_hour) or not 0 <= self.peak_hour < 24:
            raise ConfigError(k + "peak_hour", self.peak_hour, "an hour in [0, 24)")
        if not _is_real(self.failure_concentration) or self.failure_concentration <= 0:
            raise ConfigError(k + "failure_concentration", self.failure_concentration, "a number > 0")
        offs = _real_tuple(k + "tz_offsets_h", self.tz_offsets_h, None, "UTC offsets in [-12, 14] hours")
        if not offs or min(offs) < -12 or max(offs) > 14:
            raise ConfigError(k + "tz_offsets_h", self.tz_offsets_h, "non-empty UTC offsets in [-12, 14] hours")
        w_allowed = f"{len(offs)} weights (one per tz offset) >= 0 summing to 1"
        w = _real_tuple(k + "tz_weights", self.tz_weights, len(offs), w_allowed)
        if min(w) < 0 or abs(sum(w) - 1.0) > 1e-6:
            raise ConfigError(k + "tz_weights", self.tz_weights, w_allowed)
        object.__setattr__(self, "tz_offsets_h", offs)
        object.__setattr__(self, "tz_weights", w)


@dataclass
class Profiles:
    """Profiles of ``n`` devices as parallel arrays (row ``i`` = one device).

    ``device_id`` is each row's index in the full fleet of ``fleet_size`` devices; it is
    ``arange(n)`` for a fleet made by ``make_profiles`` and is kept by ``subset`` so seeded
    draws on a subset match the same devices' draws on the full fleet.
    """

    tier: np.ndarray  # int8, 0 = low, 1 = mid, 2 = high
    flops: np.ndarray  # float64 sustained training FLOP/s
    down_bps: np.ndarray  # float64 downlink bytes/s
    up_bps: np.ndarray  # float64 uplink bytes/s
    rtt_s: np.ndarray  # float64 round-trip time, seconds
    tz_offset_h: np.ndarray  # float64 UTC offset, hours
    failure_p: np.ndarray  # float64 per-exchange failure probability
    online_peak: np.ndarray  # float64 online probability at the local peak hour
    online_trough: np.ndarray  # float64 online probability 12 h from the peak
    peak_hour: np.ndarray  # float64 local hour of peak availability
    device_id: np.ndarray | None = None  # int64 index in the full fleet
    fleet_size: int | None = None

    _FLOAT_FIELDS = (
        "flops", "down_bps", "up_bps", "rtt_s", "tz_offset_h", "failure_p",
        "online_peak", "online_trough", "peak_hour",
    )

    def __post_init__(self) -> None:
        self.tier = np.asarray(self.tier, dtype=np.int8)
        n = len(self.tier)
        for name in self._FLOAT_FIELDS:
            arr = np.asarray(getattr(self, name), dtype=np.float64)
            if arr.shape != (n,):
                raise ValueError(f"Profiles.{name} has shape {arr.shape}, expected ({n},)")
            setattr(self, name, arr)
        if self.device_id is None:
            self.device_id = np.arange(n, dtype=np.int64)
        self.device_id = np.asarray(self.device_id, dtype=np.int64)
        if self.device_id.shape != (n,):
            raise ValueError("Profiles.device_id must have one entry per device")
        if self.fleet_size is None:
            self.fleet_size = int(self.device_id.max()) + 1 if n else 0
        if n and (self.device_id.min() < 0 or self.device_id.max() >= self.fleet_size):
            raise ValueError("Profiles.device_id must lie in [0, fleet_size)")

    def __len__(self) -> int:
        return len(self.tier)

    def subset(self, idx: np.ndarray) -> Profiles:
        """The profiles of rows ``idx`` (integer indices or a boolean mask), same fleet."""
        idx = np.asarray(idx)
        names = ("tier", *self._FLOAT_FIELDS, "device_id")
        arrays = {name: getattr(self, name)[idx] for name in names}
        return Profiles(**arrays, fleet_size=self.fleet_size)


def make_profiles(n: int, cfg: ProfileConfig = ProfileConfig(), seed: int = 0) -> Profiles:
    """Draw ``n`` device profiles from ``cfg``; same ``(n, cfg, seed)`` gives the same fleet."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"make_profiles: n = {n!r} must be an integer >= 0")
    rng = np.random.default_rng(np.random.SeedSequence([seed, _PROFILE_TAG]))
    tier = rng.choice(3, size=n, p=np.asarray(cfg.tier_fractions) / sum(cfg.tier_fractions))
    tier = tier.astype(np.int8)
    z = rng.standard_normal((4, n))

    def lognormal(medians: tuple[float, ...], sigma: float, zrow: np.ndarray) -> np.ndarray:
        return np.asarray(medians)[tier] * np.exp(sigma * zrow)

    flops = lognormal(cfg.tier_gflops, cfg.gflops_sigma, z[0]) * 1e9
    bw = cfg.bandwidth_sigma
    down_bps = lognormal(cfg.down_mbps, bw, z[1]) * (1e6 / 8)
    z_up = UP_DOWN_CORRELATION * z[1] + math.sqrt(1 - UP_DOWN_CORRELATION**2) * z[2]
    up_bps = lognormal(cfg.up_mbps, bw, z_up) * (1e6 / 8)
    rtt_s = lognormal(cfg.rtt_ms, cfg.rtt_sigma, z[3]) / 1e3
    w = np.asarray(cfg.tz_weights)
    tz = np.asarray(cfg.tz_offsets_h)[rng.choice(len(w), size=n, p=w / w.sum())]
    rate, kappa = cfg.failure_rate, cfg.failure_concentration
    if 0 < rate < 1:
        failure_p = rng.beta(rate * kappa, (1 - rate) * kappa, size=n)
    else:  # Beta is degenerate at the ends: every device fails always / never.
        failure_p = np.full(n, float(rate))
    return Profiles(
        tier=tier,
        flops=flops,
        down_bps=down_bps,
        up_bps=up_bps,
        rtt_s=rtt_s,
        tz_offset_h=tz,
        failure_p=failure_p,
        online_peak=np.full(n, cfg.online_peak),
        online_trough=np.full(n, cfg.online_trough),
        peak_hour=np.full(n, cfg.peak_hour),
    )


def local_hour(profiles: Profiles, t_seconds: float | np.ndarray, start_clock: float = 0.0) -> np.ndarray:
    """Local time of day (hours in [0, 24)) of every device at simulated time ``t``."""
    utc_h = (start_clock + np.asarray(t_seconds, dtype=np.float64)) / 3600.0
    return np.mod(utc_h + profiles.tz_offset_h, 24.0)


def online_probability(
    profiles: Profiles, t_seconds: float | np.ndarray, start_clock: float = 0.0
) -> np.ndarray:
    """Probability that each device is online at simulated time ``t_seconds``.

    The UTC clock is ``start_clock + t`` seconds past midnight; ``t_seconds`` is a scalar
    or an array broadcastable to ``(len(profiles),)``. The curve is a cosine over the local
    day, ``online_peak`` at ``peak_hour`` and ``online_trough`` twelve hours away.
    """
    phase = 2 * np.pi * (local_hour(profiles, t_seconds, start_clock) - profiles.peak_hour) / 24.0
    amp = profiles.online_peak - profiles.online_trough
    return profiles.online_trough + amp * 0.5 * (1.0 + np.cos(phase))


def _fleet_uniforms(profiles: Profiles, entropy: list[int]) -> np.ndarray:
    # Draw for the whole fleet in device-id order, then pick this subset's rows: a
    # device's uniform depends only on (entropy, device id), not on who else is asked.
    u = np.random.default_rng(np.random.SeedSequence(entropy)).random(profiles.fleet_size)
    return u[profiles.device_id]


def draw_online(
    profiles: Profiles,
    t_seconds: float | np.ndarray,
    seed: int,
    round: int,
    step: int = 0,
    start_clock: float = 0.0,
) -> np.ndarray:
    """Which devices are online at ``t_seconds`` (bool array), reproducible per ``(seed, round, step)``."""
    u = _fleet_uniforms(profiles, [seed, _ONLINE_TAG, round, step])
    return u < online_probability(profiles, t_seconds, start_clock)


def draw_failures(profiles: Profiles, seed: int, round: int, exchange: int) -> np.ndarray:
    """Which devices fail during exchange ``exchange`` of ``round`` (bool array), reproducible."""
    return _fleet_uniforms(profiles, [seed, _FAILURE_TAG, round, exchange]) < profiles.failure_p


def transfer_seconds(
    profiles: Profiles, bytes_down: float | np.ndarray, bytes_up: float | np.ndarray
) -> np.ndarray:
    """Seconds to download ``bytes_down`` and upload ``bytes_up`` on each device.

    ``bytes_down / down_bps + bytes_up / up_bps``, plus two round trips (request and
    response) whenever any bytes move. Inputs broadcast against ``(len(profiles),)``.
    """
    bd = np.asarray(bytes_down, dtype=np.float64)
    bu = np.asarray(bytes_up, dtype=np.float64)
    if np.any(bd < 0) or np.any(bu < 0):
        raise ValueError("transfer_seconds: byte counts must be >= 0")
    moved = (bd > 0) | (bu > 0)
    return bd / profiles.down_bps + bu / profiles.up_bps + np.where(moved, 2.0 * profiles.rtt_s, 0.0)


def compute_seconds(profiles: Profiles, flops: float | np.ndarray) -> np.ndarray:
    """Seconds each device needs for ``flops`` floating-point operations of training."""
    f = np.asarray(flops, dtype=np.float64)
    if np.any(f < 0):
        raise ValueError("compute_seconds: flops must be >= 0")
    return f / profiles.flops


if __name__ == "__main__":
    for n in (2_000, 100_000, 1_000_000):
        t0 = time.perf_counter()
        p = make_profiles(n, ProfileConfig(), seed=0)
        t1 = time.perf_counter()
        on = draw_online(p, 3600.0, seed=0, round=1)
        t2 = time.perf_counter()
        print(
            f"make_profiles({n:>9,}): {t1 - t0:.3f} s; draw_online: {t2 - t1:.4f} s; "
            f"online now {on.mean():.2f}; tiers {np.bincount(p.tier, minlength=3) / n}"
        )
