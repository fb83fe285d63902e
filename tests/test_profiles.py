"""Tests for devices.profiles: fleet distribution, diurnal availability, seeded draws, costs."""
import numpy as np
import pytest

from devices.profiles import (
    DEFAULT_TZ_OFFSETS_H,
    DEFAULT_TZ_WEIGHTS,
    ProfileConfig,
    Profiles,
    compute_seconds,
    draw_failures,
    draw_online,
    make_profiles,
    online_probability,
    transfer_seconds,
)
from simulator.errors import ConfigError

FLOAT_FIELDS = ("flops", "down_bps", "up_bps", "rtt_s", "tz_offset_h", "failure_p",
                "online_peak", "online_trough", "peak_hour")


@pytest.fixture(scope="module")
def fleet():
    return make_profiles(20_000, ProfileConfig(), seed=11)


def _toy(n=2, **over):
    base = dict(
        tier=np.zeros(n), flops=np.full(n, 1e9), down_bps=np.full(n, 1e6), up_bps=np.full(n, 1e5),
        rtt_s=np.full(n, 0.1), tz_offset_h=np.zeros(n), failure_p=np.zeros(n),
        online_peak=np.full(n, 0.8), online_trough=np.full(n, 0.15), peak_hour=np.full(n, 21.0),
    )
    base.update(over)
    return Profiles(**base)


def test_shapes_and_dtypes():
    p = make_profiles(1000, ProfileConfig(), seed=0)
    assert len(p) == 1000
    assert p.tier.dtype == np.int8 and p.tier.shape == (1000,)
    for name in FLOAT_FIELDS:
        arr = getattr(p, name)
        assert arr.dtype == np.float64 and arr.shape == (1000,), name
    assert np.array_equal(p.device_id, np.arange(1000)) and p.fleet_size == 1000
    assert set(np.unique(p.tier)) == {0, 1, 2}
    assert (p.flops > 0).all() and (p.down_bps > 0).all() and (p.up_bps > 0).all()
    assert ((p.failure_p >= 0) & (p.failure_p <= 1)).all()
    assert len(make_profiles(0, ProfileConfig(), seed=0)) == 0


def test_same_seed_same_fleet_other_seed_differs():
    a, b, c = (make_profiles(500, ProfileConfig(), seed=s) for s in (3, 3, 4))
    for name in ("tier", *FLOAT_FIELDS):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name
    assert not np.array_equal(a.flops, c.flops)
    assert not np.array_equal(a.tier, c.tier)


def test_tier_proportions_and_medians(fleet):
    cfg = ProfileConfig()
    frac = np.bincount(fleet.tier, minlength=3) / len(fleet)
    np.testing.assert_allclose(frac, cfg.tier_fractions, atol=0.02)
    for t in range(3):
        m = fleet.tier == t
        # Medians of the lognormals are the configured per-tier values (Mbit/s -> bytes/s).
        assert np.median(fleet.flops[m]) == pytest.approx(cfg.tier_gflops[t] * 1e9, rel=0.05)
        assert np.median(fleet.down_bps[m]) == pytest.approx(cfg.down_mbps[t] * 1e6 / 8, rel=0.06)
        assert np.median(fleet.up_bps[m]) == pytest.approx(cfg.up_mbps[t] * 1e6 / 8, rel=0.06)
        assert np.median(fleet.rtt_s[m]) == pytest.approx(cfg.rtt_ms[t] / 1e3, rel=0.05)
    # Spread within a tier follows the sigma: log-std of mid-tier speed ~ gflops_sigma.
    assert np.log(fleet.flops[fleet.tier == 1]).std() == pytest.approx(cfg.gflops_sigma, rel=0.05)
    # Uplink and downlink are positively correlated (shared access network).
    assert np.corrcoef(np.log(fleet.down_bps), np.log(fleet.up_bps))[0, 1] > 0.6


def test_time_zones_and_failures(fleet):
    offs, w = np.array(DEFAULT_TZ_OFFSETS_H), np.array(DEFAULT_TZ_WEIGHTS)
    assert np.isin(fleet.tz_offset_h, offs).all()
    freq = np.array([(fleet.tz_offset_h == o).mean() for o in offs])
    np.testing.assert_allclose(freq, w, atol=0.01)
    assert fleet.failure_p.mean() == pytest.approx(0.02, abs=0.002)
    assert np.median(fleet.failure_p) < 0.02 < fleet.failure_p.max()  # skewed: few flaky devices
    never = make_profiles(100, ProfileConfig(failure_rate=0.0), seed=0)
    always = make_profiles(100, ProfileConfig(failure_rate=1.0), seed=0)
    assert not draw_failures(never, seed=0, round=1, exchange=0).any()
    assert draw_failures(always, seed=0, round=1, exchange=0).all()


def test_diurnal_curve_peaks_at_peak_hour_local_time():
    p = _toy(3, tz_offset_h=np.array([0.0, 5.5, -8.0]))
    minutes = np.arange(0, 24 * 60) * 60.0
    prob = np.stack([online_probability(p, t) for t in minutes])  # (1440, 3)
    assert prob.max(axis=0) == pytest.approx([0.8] * 3)
    assert prob.min(axis=0) == pytest.approx([0.15] * 3)
    utc_peak_h = minutes[prob.argmax(axis=0)] / 3600
    np.testing.assert_allclose(utc_peak_h, np.mod(21.0 - p.tz_offset_h, 24))
    utc_trough_h = minutes[prob.argmin(axis=0)] / 3600
    np.testing.assert_allclose(utc_trough_h, np.mod(9.0 - p.tz_offset_h, 24))
    # Halfway between peak and trough (6 h off) the probability is the midpoint.
    six_after = (np.mod(21.0 - p.tz_offset_h, 24) + 6) * 3600
    np.testing.assert_allclose(online_probability(p, six_after), 0.475)
    # start_clock shifts the UTC clock; per-device times broadcast.
    np.testing.assert_allclose(online_probability(p, 100.0, start_clock=7200.0),
                               online_probability(p, 7300.0))
    cfg = make_profiles(5, ProfileConfig(online_peak=0.6, online_trough=0.6), seed=0)
    np.testing.assert_allclose(online_probability(cfg, 12345.0), 0.6)


def test_draw_online_subset_matches_full_draw(fleet):
    full = draw_online(fleet, 3600.0, seed=5, round=3, step=1)
    idx = np.array([17, 3, 19_999, 4_000, 5])
    sub = draw_online(fleet.subset(idx), 3600.0, seed=5, round=3, step=1)
    np.testing.assert_array_equal(sub, full[idx])
    mask = fleet.tier == 2
    np.testing.assert_array_equal(draw_online(fleet.subset(mask), 3600.0, 5, 3, 1), full[mask])
    # Subsets of subsets keep fleet ids.
    nested = fleet.subset(np.arange(100, 200)).subset(np.array([0, 50]))
    np.testing.assert_array_equal(nested.device_id, [100, 150])
    np.testing.assert_array_equal(draw_online(nested, 3600.0, 5, 3, 1), full[[100, 150]])
    # Reproducible, but a different round or step gives a different draw.
    np.testing.assert_array_equal(draw_online(fleet, 3600.0, seed=5, round=3, step=1), full)
    assert not np.array_equal(draw_online(fleet, 3600.0, seed=5, round=4, step=1), full)
    assert not np.array_equal(draw_online(fleet, 3600.0, seed=5, round=3, step=0), full)
    # The draw follows the probability.
    assert full.mean() == pytest.approx(online_probability(fleet, 3600.0).mean(), abs=0.015)


def test_draw_failures_subset_and_rate(fleet):
    full = draw_failures(fleet, seed=1, round=2, exchange=0)
    idx = np.arange(0, 20_000, 7)
    np.testing.assert_array_equal(draw_failures(fleet.subset(idx), 1, 2, 0), full[idx])
    assert not np.array_equal(draw_failures(fleet, 1, 2, 1), full)
    assert full.mean() == pytest.approx(0.02, abs=0.005)


def test_transfer_and_compute_seconds_hand_computed():
    p = _toy(2, down_bps=np.array([1e6, 2e6]), up_bps=np.array([1e5, 5e5]),
             rtt_s=np.array([0.1, 0.05]), flops=np.array([2e9, 1e10]))
    np.testing.assert_allclose(transfer_seconds(p, 1e6, 1e5), [1 + 1 + 0.2, 0.5 + 0.2 + 0.1])
    np.testing.assert_allclose(transfer_seconds(p, 0, 0), [0.0, 0.0])
    np.testing.assert_allclose(transfer_seconds(p, np.array([0.0, 4e6]), 0), [0.0, 2.0 + 0.1])
    np.testing.assert_allclose(transfer_seconds(p, 0, 1e5), [1.0 + 0.2, 0.2 + 0.1])
    np.testing.assert_allclose(compute_seconds(p, 1e10), [5.0, 1.0])
    np.testing.assert_allclose(compute_seconds(p, np.array([2e9, 0.0])), [1.0, 0.0])
    with pytest.raises(ValueError):
        transfer_seconds(p, -1.0, 0.0)


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(tier_fractions=(0.5, 0.5, 0.5)), "profiles.tier_fractions"),
        (dict(tier_fractions=(1.2, -0.2, 0.0)), "profiles.tier_fractions"),
        (dict(tier_fractions=(0.5, 0.5)), "profiles.tier_fractions"),
        (dict(tier_gflops=(2.0, 0.0, 40.0)), "profiles.tier_gflops"),
        (dict(down_mbps=(5.0, "fast", 60.0)), "profiles.down_mbps"),
        (dict(up_mbps=(-1.0, 5.0, 15.0)), "profiles.up_mbps"),
        (dict(rtt_ms=(0.0, 80.0, 40.0)), "profiles.rtt_ms"),
        (dict(bandwidth_sigma=-0.1), "profiles.bandwidth_sigma"),
        (dict(online_peak=1.5), "profiles.online_peak"),
        (dict(online_trough=0.9), "profiles.online_trough"),
        (dict(failure_rate=-0.01), "profiles.failure_rate"),
        (dict(peak_hour=24.0), "profiles.peak_hour"),
        (dict(tz_weights=(1.0,)), "profiles.tz_weights"),
        (dict(tz_offsets_h=(0.0, 15.0), tz_weights=(0.5, 0.5)), "profiles.tz_offsets_h"),
    ],
)
def test_config_validation_names_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        ProfileConfig(**kwargs)
    assert err.value.key == key
    assert key in str(err.value)


def test_config_accepts_lists_as_from_toml():
    cfg = ProfileConfig(tier_fractions=[0.2, 0.2, 0.6], tz_offsets_h=[0, 1], tz_weights=[0.5, 0.5])
    assert cfg.tier_fractions == (0.2, 0.2, 0.6) and cfg.tz_offsets_h == (0.0, 1.0)
    p = make_profiles(5_000, cfg, seed=0)
    assert (p.tier == 2).mean() == pytest.approx(0.6, abs=0.03)
    assert set(np.unique(p.tz_offset_h)) == {0.0, 1.0}
