"""Tests for devices.synthetic: the drifting synthetic fleet and its ground-truth tastes."""
from pathlib import Path

import numpy as np
import pytest

from devices.data import DriftEvent, Interactions, Timeline
from devices.synthetic import SyntheticConfig, SyntheticFleet, generate
from simulator.errors import ConfigError


@pytest.fixture(scope="module")
def default_fleet():
    return generate(SyntheticConfig(), seed=0)


def _top_share(counts: np.ndarray, frac: float) -> float:
    c = np.sort(counts)[::-1]
    return c[: int(len(c) * frac)].sum() / c.sum()


def _affinity(fleet: SyntheticFleet, period: int = 0):
    """User, round and affinity (taste of ``period`` . item factor) of every interaction."""
    it = fleet.interactions
    user = it.user_of()
    rnd = fleet.timeline.round_of(it.times)
    taste = fleet.tastes[period][user].astype(np.float64)
    aff = np.einsum("nd,nd->n", taste, fleet.item_factors[it.items].astype(np.float64))
    return user, rnd, aff


def test_shapes_dtypes_and_timeline(default_fleet):
    f, cfg = default_fleet, SyntheticConfig()
    it = f.interactions
    assert isinstance(it, Interactions) and isinstance(f.timeline, Timeline)
    assert it.n_users == 2000 and it.n_items == 1000
    assert it.indptr.dtype == np.int64 and it.items.dtype == np.int32 and it.times.dtype == np.float64
    assert it.items.min() >= 0 and it.items.max() < 1000
    assert f.tastes.shape == (11, 2000, 16) and f.tastes.dtype == np.float32
    assert f.item_factors.shape == (1000, 16) and f.item_factors.dtype == np.float32
    assert f.activity_rate.shape == (2000,) and f.item_popularity_logit.shape == (1000,)
    tl = f.timeline
    assert tl.history_end == 14 * 86400 and tl.round_seconds == 4 * 3600 and tl.n_rounds == 10
    assert tl.start_clock == 0.0
    assert generate(SyntheticConfig(start_hour=6.5), seed=0).timeline.start_clock == 6.5 * 3600
    # Item factors have per-coordinate std 1/sqrt(d); tastes N(0, 1).
    assert f.item_factors.std() == pytest.approx(0.25, rel=0.03)
    assert f.tastes[0].std() == pytest.approx(1.0, rel=0.03)


def test_same_seed_same_fleet_other_seed_differs(default_fleet):
    again = generate(SyntheticConfig(), seed=0)
    other = generate(SyntheticConfig(), seed=1)
    for name in ("indptr", "items", "times"):
        assert np.array_equal(getattr(again.interactions, name), getattr(default_fleet.interactions, name))
    assert np.array_equal(again.tastes, default_fleet.tastes)
    assert np.array_equal(again.item_factors, default_fleet.item_factors)
    assert not np.array_equal(other.interactions.counts, default_fleet.interactions.counts)
    assert not np.array_equal(other.tastes[0], default_fleet.tastes[0])


def test_times_sorted_and_inside_windows(default_fleet):
    it, tl = default_fleet.interactions, default_fleet.timeline
    user = it.user_of()
    same_user = user[1:] == user[:-1]
    assert (np.diff(it.times)[same_user] >= 0).all()
    end = tl.history_end + tl.n_rounds * tl.round_seconds
    assert it.times.min() >= 0 and it.times.max() < end
    rnd = tl.round_of(it.times)
    assert rnd.min() == 0 and rnd.max() == tl.n_rounds  # nothing after the last round
    per_round = np.bincount(rnd, minlength=tl.n_rounds + 1)
    # Expected per round: n_devices * mean_daily * round_hours / 24 = 666.7 (sd ~ 37).
    np.testing.assert_allclose(per_round[1:], 2000 * 2.0 * 4 / 24, rtol=0.25)
    # Every device has history, so history-activity buckets are defined.
    history_counts = np.bincount(user[rnd == 0], minlength=it.n_users)
    assert history_counts.min() >= 1
    assert history_counts.mean() == pytest.approx(28.0, rel=0.15)


def test_activity_is_long_tailed(default_fleet):
    counts = default_fleet.interactions.counts
    # Default lognormal sigma 1.2 gives the top 10% of users ~44-50% of all interactions
    # (0.435 lowest over 30 seeds); equal rates would give ~13%.
    assert _top_share(counts, 0.1) > 0.40
    assert np.median(counts) < 0.6 * counts.mean()
    flat = generate(SyntheticConfig(activity_sigma=0.0), seed=0).interactions.counts
    assert _top_share(flat, 0.1) < 0.2


def test_popularity_is_skewed(default_fleet):
    item_counts = np.bincount(default_fleet.interactions.items, minlength=1000)
    assert _top_share(item_counts, 0.1) > 0.55  # ~0.65-0.74 over seeds; uniform = 0.10
    # The most popular items by the generator's logit are the most chosen.
    top_true = np.argsort(default_fleet.item_popularity_logit)[::-1][:20]
    assert item_counts[top_true].mean() > 10 * item_counts.mean()
    flat = generate(SyntheticConfig(popularity_zipf=0.0, taste_strength=0.0), seed=0)
    assert _top_share(np.bincount(flat.interactions.items, minlength=1000), 0.1) < 0.15


def test_item_draws_follow_the_softmax():
    cfg = SyntheticConfig(n_devices=3, n_items=50, mean_daily_interactions=2000.0, activity_sigma=0.0,
                          drift="none")
    f = generate(cfg, seed=3)
    it = f.interactions
    for u in range(3):
        items = it.items[it.indptr[u]:it.indptr[u + 1]]
        logit = 3.0 * f.tastes[0, u].astype(np.float64) @ f.item_factors.T.astype(np.float64)
        logit += f.item_popularity_logit
        p = np.exp(logit - logit.max())
        p /= p.sum()
        emp = np.bincount(items, minlength=50) / len(items)
        se = np.sqrt(p * (1 - p) / len(items))
        assert np.abs(emp - p).max() < 5 * se.max()


def test_item_major_and_row_wise_cdfs_draw_the_same_items(monkeypatch):
    """The sampler lays a chunk out item-major when it has many rows; both layouts must draw
    exactly the same items (an off-by-one stride would draw other, still plausible, items)."""
    import devices.synthetic as synth

    rng = np.random.default_rng(7)
    n_rows, n_items, d = 3000, 37, 5
    taste = rng.standard_normal((n_rows, d)).astype(np.float32)
    counts = rng.integers(0, 6, n_rows)
    factors = rng.standard_normal((n_items, d)).astype(np.float32)
    pop = -np.log(rng.permutation(n_items) + 1.0)
    u = rng.random(int(counts.sum()))
    draws = {}
    for name, rows in (("row-wise", 10**9), ("item-major", 1)):
        monkeypatch.setattr(synth, "_ITEM_MAJOR_ROWS", rows)
        monkeypatch.setattr(synth, "_SAMPLER_CELLS", 1000 * n_items)  # 3 chunks of 1,000 rows
        draws[name] = synth._sample_items(taste, counts, factors, pop, 3.0, u)
    np.testing.assert_array_equal(draws["item-major"], draws["row-wise"])
    # and the draws are the inverse CDF of each row's softmax (float64 here)
    logit = 3.0 * taste.astype(np.float64) @ factors.T.astype(np.float64) + pop
    p = np.exp(logit - logit.max(axis=1, keepdims=True))
    cdf = np.cumsum(p, axis=1) / p.sum(axis=1, keepdims=True)
    row = np.repeat(np.arange(n_rows), counts)
    expected = (cdf[row] <= u[:, None]).sum(axis=1)
    assert (draws["row-wise"] == np.minimum(expected, n_items - 1)).mean() > 0.999  # float32 CDF


def test_choices_follow_taste(default_fleet):
    _, rnd, aff = _affinity(default_fleet)
    # Chosen items align with the user's taste (random items: affinity ~ 0, sd 1).
    assert aff[rnd == 0].mean() > 1.5


def test_no_drift_keeps_taste_and_items():
    f = generate(SyntheticConfig(drift="none"), seed=2)
    assert f.timeline.drift_events == ()
    assert (f.tastes == f.tastes[0]).all()
    _, rnd, aff = _affinity(f)
    assert abs(aff[rnd >= 1].mean() - aff[rnd == 0].mean()) < 0.2


def test_gradual_drift_random_walk():
    cfg = SyntheticConfig(drift="gradual", drift_rate=0.3, mean_daily_interactions=6.0)
    f = generate(cfg, seed=4)
    t = f.tastes.astype(np.float64)
    norm0 = np.linalg.norm(t[0], axis=1)
    # Only the direction drifts: every user's taste norm is kept.
    np.testing.assert_allclose(np.linalg.norm(t, axis=2), np.broadcast_to(norm0, t.shape[:2]), rtol=1e-5)
    step = (np.linalg.norm(np.diff(t, axis=0), axis=2) / norm0).mean(axis=1)
    np.testing.assert_allclose(step, 0.3, rtol=0.12)
    dist = np.linalg.norm(t - t[0], axis=2).mean(axis=1)
    assert (np.diff(dist) > 0).all() and dist[10] > 2.5 * dist[1]
    assert f.timeline.drift_events == (DriftEvent(1, "gradual", 1.0, f.timeline.drift_events[0].note),)
    # Choices drift away from the history taste.
    _, rnd, aff = _affinity(f)
    early, late = aff[(rnd >= 1) & (rnd <= 2)].mean(), aff[rnd >= 9].mean()
    assert aff[rnd == 0].mean() - late > 0.5 and early - late > 0.3


def test_sudden_drift_moves_exactly_the_fraction():
    cfg = SyntheticConfig(drift="sudden", drift_rounds=(3, 7), drift_fraction=0.3)
    f = generate(cfg, seed=5)
    changed = np.any(f.tastes[1:] != f.tastes[:-1], axis=2)  # (n_rounds, n): round r vs r-1
    np.testing.assert_array_equal(changed.sum(axis=1), [0, 0, 600, 0, 0, 0, 600, 0, 0, 0])
    assert f.timeline.drift_events == tuple(
        DriftEvent(r, "sudden", 0.3, e.note) for r, e in zip((3, 7), f.timeline.drift_events)
    )
    # Affected users' choices leave their old taste; unaffected users' do not.
    jumped = changed[2]  # jumped at round 3
    stay = ~changed.any(axis=0)
    user, rnd, aff = _affinity(f)
    before = (rnd >= 1) & (rnd <= 2)
    after = (rnd >= 3) & (rnd <= 6)
    assert aff[before & jumped[user]].mean() - aff[after & jumped[user]].mean() > 1.5
    assert abs(aff[before & stay[user]].mean() - aff[after & stay[user]].mean()) < 0.3
    # Their new items follow the new taste instead.
    _, _, aff_new = _affinity(f, period=3)
    assert aff_new[after & jumped[user]].mean() > 1.5


def test_recurring_drift_alternates_between_two_tastes():
    cfg = SyntheticConfig(drift="recurring", drift_period=3, n_rounds=10)
    f = generate(cfg, seed=6)
    a, b = f.tastes[0], f.tastes[4]
    assert np.any(a != b, axis=1).all()  # B is a different taste for every user
    for r, which in zip(range(1, 11), "AAABBBAAAB"):
        assert np.array_equal(f.tastes[r], a if which == "A" else b), r
    assert [(e.round, e.kind, e.fraction) for e in f.timeline.drift_events] == [
        (4, "recurring", 1.0), (7, "recurring", 1.0), (10, "recurring", 1.0)
    ]
    _, rnd, aff = _affinity(f)
    in_a = np.isin(rnd, [1, 2, 3, 7, 8, 9])
    in_b = np.isin(rnd, [4, 5, 6, 10])
    assert aff[in_a].mean() > 1.5 and abs(aff[in_b].mean()) < 0.4


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(n_devices=0), "data.n_devices"),
        (dict(n_items=2.5), "data.n_items"),
        (dict(latent_dim=True), "data.latent_dim"),
        (dict(popularity_zipf=-1.0), "data.popularity_zipf"),
        (dict(mean_daily_interactions=0.0), "data.mean_daily_interactions"),
        (dict(activity_sigma=-0.5), "data.activity_sigma"),
        (dict(history_days="14"), "data.history_days"),
        (dict(round_hours=0), "data.round_hours"),
        (dict(n_rounds=0), "data.n_rounds"),
        (dict(drift="abrupt"), "data.drift"),
        (dict(drift_rate=-0.1), "data.drift_rate"),
        (dict(drift="sudden", drift_rounds=(0,)), "data.drift_rounds"),
        (dict(drift="sudden", drift_rounds=(11,)), "data.drift_rounds"),
        (dict(drift_rounds=(2.5,)), "data.drift_rounds"),
        (dict(drift_fraction=1.5), "data.drift_fraction"),
        (dict(drift_period=0), "data.drift_period"),
        (dict(start_hour=24.0), "data.start_hour"),
    ],
)
def test_config_validation_names_key(kwargs, key):
    with pytest.raises(ConfigError) as err:
        SyntheticConfig(**kwargs)
    assert err.value.key == key
    assert key in str(err.value)


def test_drift_rounds_only_checked_for_sudden_and_lists_accepted():
    assert SyntheticConfig(drift="none", n_rounds=3).drift_rounds == (5,)
    assert SyntheticConfig(drift="sudden", drift_rounds=[2, 4]).drift_rounds == (2, 4)


# Taste departure (DCCL's premise) ------------------------------------------------------


def test_taste_departure_is_linear_in_activity_rank():
    from devices.synthetic import taste_departure

    cfg = SyntheticConfig(taste_departure_head=0.2, taste_departure_tail=1.0)
    np.testing.assert_allclose(taste_departure(cfg, np.array([3.0, 1.0, 2.0, 0.5])), [0.2, 0.7333333, 0.4666667, 1.0])


def test_taste_departure_zero_is_the_crowd_and_tail_departs_more():
    crowd = generate(SyntheticConfig(n_devices=50, drift="none", taste_departure_head=0.0, taste_departure_tail=0.0), 1)
    assert np.allclose(crowd.tastes[0], crowd.tastes[0][0])  # everyone holds the crowd's taste
    f = generate(SyntheticConfig(n_devices=2000, drift="none", taste_departure_head=0.2, taste_departure_tail=1.0), 1)
    t = f.tastes[0] / np.linalg.norm(f.tastes[0], axis=1, keepdims=True)
    order = np.argsort(f.activity_rate)
    light, heavy = t[order[:100]], t[order[-100:]]

    def mean_pair_cos(x):
        c = x @ x.T
        return (c.sum() - np.trace(c)) / (len(x) * (len(x) - 1))

    # two users' tastes share the crowd part: E cos ~ sqrt(1 - δ1²) sqrt(1 - δ2²)
    assert mean_pair_cos(heavy) == pytest.approx(0.93, abs=0.04)  # δ ~ 0.2..0.24
    assert abs(mean_pair_cos(light)) < 0.1  # δ ~ 0.96..1: own tastes
    with pytest.raises(ConfigError, match="taste_departure_tail"):
        SyntheticConfig(taste_departure_tail=1.5)


FORKING_BUILD = """
import hashlib, subprocess, threading
from devices.synthetic import SyntheticConfig, generate

stop = threading.Event()
def fork_in_a_loop():  # as Ray starting its processes beside the build does
    while not stop.is_set():
        subprocess.Popen(["true"], preexec_fn=lambda: None).wait()
forker = threading.Thread(target=fork_in_a_loop, daemon=True)
forker.start()
fleet = generate(SyntheticConfig(n_devices=60_000, n_rounds=3), seed=0)
stop.set()
print(hashlib.sha256(fleet.interactions.items.tobytes()).hexdigest())
"""


def test_build_completes_while_another_thread_forks():
    """``FleetRun.connect`` starts Ray in a thread while the fleet is built. OpenBLAS stops
    its thread pool before every fork, which hung the sampler's matrix products in flight;
    they now run single-threaded in the sampler's own threads. (A child process: a hang
    fails the test at its timeout instead of stopping the suite.)"""
    import hashlib
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", FORKING_BUILD], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr[-2000:]
    expected = generate(SyntheticConfig(n_devices=60_000, n_rounds=3), seed=0)
    assert res.stdout.split()[-1] == hashlib.sha256(expected.interactions.items.tobytes()).hexdigest()
