"""Tests of simulator.metrics: hand-computed fleets, and agreement with sklearn."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from simulator.metrics import (
    ScoreHistogram,
    activity_buckets,
    device_metrics,
    per_round,
    summarize,
    user_auc,
)


def _labels(n_rows: int, n_cand: int) -> np.ndarray:
    y = np.zeros((n_rows, n_cand))
    y[:, 0] = 1
    return y


# --- device_metrics -------------------------------------------------------------------


def test_device_metrics_hand_example():
    # Device 0 owns rows A and C, device 1 owns row B, device 2 has no rows.
    # A: positive 2.0 vs negatives {1, 3, 0}: one negative >= 2.0 -> rank 1,
    #    HR 1, NDCG 1/log2(3).
    # B: positive 0.0 vs {1, 2, -3}: rank 2, HR 1, NDCG 1/log2(4) = 0.5.
    #    AUC of device 1 = 1 win (over -3) / 3 pairs = 1/3.
    # C: positive 0.5 vs {0.5, -1, 1.5}: tie counts against it -> rank 2, NDCG 0.5.
    # Device 0 pooled: positives {2.0, 0.5}, negatives {1, 3, 0, 0.5, -1, 1.5}.
    #    2.0 beats 1, 0, 0.5, -1, 1.5 -> 5; 0.5 beats 0, -1 and ties 0.5 -> 2.5.
    #    AUC = 7.5 / (2 * 6) = 0.625 (the mean of the per-row AUCs would be 0.5833).
    scores = np.array(
        [
            [2.0, 1.0, 3.0, 0.0],
            [0.0, 1.0, 2.0, -3.0],
            [0.5, 0.5, -1.0, 1.5],
        ]
    )
    owner = np.array([0, 1, 0])
    m = device_metrics(scores, owner, 3)
    assert set(m) == {"auc", "hr10", "ndcg10", "logloss", "n_pos", "n_neg"}
    assert all(len(v) == 3 for v in m.values())
    np.testing.assert_allclose(m["auc"][:2], [0.625, 1 / 3])
    np.testing.assert_allclose(m["hr10"][:2], [1.0, 1.0])
    np.testing.assert_allclose(m["ndcg10"][:2], [(1 / np.log2(3) + 0.5) / 2, 0.5])
    np.testing.assert_array_equal(m["n_pos"], [2, 1, 0])
    np.testing.assert_array_equal(m["n_neg"], [6, 3, 0])
    assert m["n_pos"].dtype.kind == "i" and m["n_neg"].dtype.kind == "i"
    # logloss from probabilities, the textbook way
    for d, rows in ((0, [0, 2]), (1, [1])):
        x = scores[rows]
        p = 1 / (1 + np.exp(-x))
        y = _labels(len(rows), 4)
        expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
        assert m["logloss"][d] == pytest.approx(expected, rel=1e-12)
    # device 2 has no rows
    for k in ("auc", "hr10", "ndcg10", "logloss"):
        assert np.isnan(m[k][2])


def test_rank_cutoff_at_10():
    # 10 negatives above the positive -> rank 10 -> outside the top 10; 9 above -> rank 9.
    neg = np.arange(1.0, 21.0)
    row10 = np.concatenate([[10.5], neg])  # negatives 11..20 are above 10.5 -> rank 10
    row9 = np.concatenate([[11.5], neg])  # 12..20 above -> rank 9
    m = device_metrics(np.stack([row10, row9]), np.array([0, 1]), 2)
    np.testing.assert_allclose(m["hr10"], [0.0, 1.0])
    np.testing.assert_allclose(m["ndcg10"], [0.0, 1 / np.log2(11)])


def test_pessimistic_ties():
    # constant model with 99 negatives: every negative ties -> rank 99 -> HR 0, NDCG 0,
    # while AUC (ties 0.5) is exactly 0.5
    m = device_metrics(np.zeros((5, 100)), np.zeros(5, dtype=int), 1)
    assert m["hr10"][0] == 0.0 and m["ndcg10"][0] == 0.0
    assert m["auc"][0] == 0.5
    # 9 ties plus 1 strictly greater -> rank 10 -> miss; 9 ties alone -> rank 9 -> hit
    row_a = np.r_[1.0, [1.0] * 9, 2.0, [0.0] * 89]
    row_b = np.r_[1.0, [1.0] * 9, [0.0] * 90]
    m = device_metrics(np.stack([row_a, row_b]), np.array([0, 1]), 2)
    np.testing.assert_allclose(m["hr10"], [0.0, 1.0])
    # -0.0 and +0.0 are the same score: a tie, as in sklearn
    m = device_metrics(np.array([[0.0, -0.0, -1.0]]), np.array([0]), 1)
    # the positive beats -1 and ties -0.0 -> AUC 0.75; one negative >= it -> rank 1
    assert m["auc"][0] == 0.75 and m["hr10"][0] == 1.0 and m["ndcg10"][0] == 1 / np.log2(3)


@pytest.mark.parametrize(
    "dtype, decimals",
    [(np.float64, None), (np.float64, 1), (np.float32, None), (np.float32, 0)],
)
def test_device_auc_and_logloss_match_sklearn(dtype, decimals):
    # rounded scores give many ties, within and across rows of a device
    rng = np.random.default_rng(7)
    n_rows, n_cand, n_dev = 1500, 21, 30
    scores = rng.normal(size=(n_rows, n_cand)) + np.linspace(0.0, 1.0, n_cand)[::-1]
    if decimals is not None:
        scores = np.round(scores, decimals)
    scores = scores.astype(dtype)
    owner = rng.integers(0, n_dev, n_rows)
    owner[owner == 4] = 5  # device 4 gets no rows
    m = device_metrics(scores, owner, n_dev)
    checked = 0
    for d in range(n_dev):
        rows = owner == d
        if not rows.any():
            assert np.isnan(m["auc"][d]) and m["n_pos"][d] == 0
            continue
        x = scores[rows].astype(np.float64).ravel()
        y = _labels(rows.sum(), n_cand).ravel()
        assert m["auc"][d] == pytest.approx(roc_auc_score(y, x), abs=1e-12)
        assert m["logloss"][d] == pytest.approx(log_loss(y, 1 / (1 + np.exp(-x))), rel=1e-9)
        checked += 1
    assert checked == n_dev - 1


def test_device_auc_exact_for_float64_values_closer_than_key_precision():
    # 1 and 1 + 2**-50 are distinct float64 values that share their leading bits, so the
    # cheap truncated codes would tie them; the exact fallback must not.
    eps = 2.0**-50
    scores = np.array([[1.0 + 2 * eps, 1.0, 1.0 + eps], [1.0 + eps, 1.0 - eps, 1.0]])
    m = device_metrics(scores, np.array([0, 0]), 1)
    # 1+2eps beats all 4 negatives; 1+eps beats 1, 1-eps, 1 and ties 1+eps -> 7.5 / 8
    # (a model whose codes tied all of them would get 0.5)
    assert m["auc"][0] == 0.9375 == roc_auc_score(_labels(2, 3).ravel(), scores.ravel())
    assert m["hr10"][0] == 1.0 and m["ndcg10"][0] == 1.0


def test_logloss_stable_for_extreme_logits():
    m = device_metrics(np.array([[-800.0, 800.0], [40.0, -40.0]]), np.array([0, 1]), 2)
    # device 0: each candidate costs 800 nats; device 1: ~e^-40 each
    assert m["logloss"][0] == pytest.approx(800.0, rel=1e-12)
    assert m["logloss"][1] == pytest.approx(math.exp(-40), rel=1e-6)


def test_device_metrics_edge_cases():
    # empty batch: all NaN, zero counts
    m = device_metrics(np.zeros((0, 100)), np.zeros(0, dtype=int), 2)
    assert np.isnan(m["auc"]).all() and np.isnan(m["hr10"]).all() and np.isnan(m["logloss"]).all()
    np.testing.assert_array_equal(m["n_pos"], [0, 0])
    # no negatives: AUC undefined, but the positive is trivially first
    m = device_metrics(np.array([[0.3]]), np.array([0]), 1)
    assert np.isnan(m["auc"][0]) and m["hr10"][0] == 1.0 and m["n_neg"][0] == 0
    with pytest.raises(ValueError, match="NaN"):
        device_metrics(np.array([[np.nan, 0.0]]), np.array([0]), 1)
    with pytest.raises(ValueError, match="owner"):
        device_metrics(np.zeros((2, 3)), np.array([0, 2]), 2)


# --- ScoreHistogram -------------------------------------------------------------------


def test_histogram_auc_close_to_sklearn_on_random_data():
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(2000, 50)) * 3
    scores[:, 0] += 1.5
    h = ScoreHistogram()
    h.add(scores)
    exact = roc_auc_score(_labels(*scores.shape).ravel(), scores.ravel())
    assert abs(h.auc() - exact) < 1e-3
    assert abs(h.auc() - exact) <= h.auc_error_bound() + 1e-15
    assert (h.n_pos, h.n_neg) == (2000, 2000 * 49)


def test_histogram_auc_exact_on_separated_values():
    # values 0.01 apart land in distinct bins (width ~9.2e-4) and equal values tie in both
    # the histogram and sklearn, so the AUC is exact. Scores outside [-30, 30] are clipped:
    # the positive at 45 then ties the negatives at 31 and 45 instead of beating one.
    rng = np.random.default_rng(4)
    grid = np.round(np.arange(-25.0, 25.0, 0.01), 2)
    x = rng.choice(grid, size=5000)
    y = rng.random(5000) < 0.3
    x[:5] = [-40.0, -35.0, 31.0, 45.0, 45.0]
    y[:5] = [True, True, False, False, True]
    h = ScoreHistogram()
    h.add_labeled(x, y)
    expected = roc_auc_score(y, np.clip(x, -30, 30))
    assert h.auc() == pytest.approx(expected, abs=1e-12)
    assert h.auc() != pytest.approx(roc_auc_score(y, x), abs=1e-9)  # the clipping mattered
    assert h.auc_error_bound() > 0
    # the range ends fall in the first and last bins
    e = ScoreHistogram()
    e.add_labeled(np.array([30.0, 29.999, -30.0]), np.array([1, 0, 0]))
    assert e.pos[-1] == 1 and e.neg[-2] == 1 and e.neg[0] == 1 and e.auc() == 1.0


def test_histogram_exact_without_shared_bins():
    x = np.array([-2.0, -1.0, 0.0, 0.0, 1.0, -3.0])
    y = np.array([0, 1, 0, 0, 1, 0])
    h = ScoreHistogram()
    h.add_labeled(x, y)
    # positives -1 (beats -2, -3) and 1 (beats -2, 0, 0, -3); 6 wins of 8 pairs
    assert h.auc() == 0.75 == roc_auc_score(y, x)
    assert h.auc_error_bound() == 0.0


def test_histogram_merge_equals_concatenation_and_roundtrips():
    rng = np.random.default_rng(5)
    a, b = rng.normal(size=(300, 10)), rng.normal(1.0, 2.0, size=(200, 10))
    ha, hb, hab = ScoreHistogram(), ScoreHistogram(), ScoreHistogram()
    ha.add(a)
    hb.add(b)
    hab.add(np.vstack([a, b]))
    merged = ha.merge(hb)
    np.testing.assert_array_equal(merged.pos, hab.pos)
    np.testing.assert_array_equal(merged.neg, hab.neg)
    assert merged.auc() == hab.auc()
    assert (ha + hb).auc() == hab.auc()
    assert ha.n_pos == 300  # merge does not mutate its inputs
    # add_labeled is the same as add with the label layout spelled out
    hl = ScoreHistogram()
    hl.add_labeled(a.ravel(), _labels(*a.shape).ravel())
    np.testing.assert_array_equal(hl.pos, ha.pos)
    np.testing.assert_array_equal(hl.neg, ha.neg)
    back = ScoreHistogram.from_dict(json.loads(json.dumps(merged.to_dict())))
    np.testing.assert_array_equal(back.pos, merged.pos)
    np.testing.assert_array_equal(back.neg, merged.neg)
    assert back.auc() == merged.auc()
    with pytest.raises(ValueError, match="different bins"):
        ha.merge(ScoreHistogram(n_bins=128))


def test_histogram_empty_class_is_nan():
    h = ScoreHistogram()
    assert math.isnan(h.auc())
    h.add_labeled(np.array([0.1, 0.2]), np.array([1, 1]))
    assert math.isnan(h.auc())
    with pytest.raises(ValueError, match="NaN"):
        h.add(np.array([[0.0, np.nan]]))


# --- activity_buckets -----------------------------------------------------------------


def test_activity_buckets_n10():
    counts = np.array([5, 9, 9, 1, 0, 3, 7, 2, 2, 4])
    # ranked: u1(9) u2(9) | u6(7) u0(5) u9(4) | u5(3) u7(2) u8(2) u3(1) u4(0)
    labels, th = activity_buckets(counts)
    assert labels.tolist() == [
        "torso", "head", "head", "tail", "tail", "tail", "torso", "tail", "tail", "torso",
    ]
    assert th == {
        "head_min_interactions": 9,
        "torso_min_interactions": 4,
        "tail_max_interactions": 3,
        "head_users": 2,
        "torso_users": 3,
        "tail_users": 5,
    }
    assert all(isinstance(v, int) for v in th.values())


def test_activity_buckets_ties_break_by_lower_index():
    labels, th = activity_buckets(np.full(10, 4))
    assert labels.tolist() == ["head"] * 2 + ["torso"] * 3 + ["tail"] * 5
    assert th["head_min_interactions"] == th["tail_max_interactions"] == 4
    # n = 5: round(1.0) = 1 head, round(2.5) = 2 tail (Python rounds halves to even)
    labels, th = activity_buckets([3, 3, 3, 1, 1])
    assert labels.tolist() == ["head", "torso", "torso", "tail", "tail"]
    assert (th["head_users"], th["torso_users"], th["tail_users"]) == (1, 2, 2)


def test_activity_buckets_match_python_sort_with_many_ties():
    counts = np.random.default_rng(2).integers(0, 6, 1001)
    ranked = sorted(range(1001), key=lambda u: (-counts[u], u))
    n_head, n_tail = round(1001 * 0.2), round(1001 * 0.5)  # 200, 500 (500.5 rounds to even)
    expected = np.array(["torso"] * 1001, dtype=object)
    expected[ranked[:n_head]] = "head"
    expected[ranked[-n_tail:]] = "tail"
    labels, th = activity_buckets(counts)
    assert labels.tolist() == expected.tolist()
    assert (th["head_users"], th["torso_users"], th["tail_users"]) == (200, 301, 500)
    assert th["head_min_interactions"] == min(counts[ranked[:200]])
    assert th["tail_max_interactions"] == max(counts[ranked[-500:]])


def test_activity_buckets_tiny():
    labels, th = activity_buckets(np.array([], dtype=int))
    assert labels.size == 0 and th["head_users"] == th["torso_users"] == th["tail_users"] == 0
    assert th["head_min_interactions"] is None and th["tail_max_interactions"] is None
    labels, th = activity_buckets([7])
    assert labels.tolist() == ["torso"] and th["torso_min_interactions"] == 7
    assert th["head_min_interactions"] is None and th["tail_users"] == 0
    labels, th = activity_buckets([1, 5])
    assert labels.tolist() == ["tail", "torso"]
    assert (th["head_users"], th["torso_users"], th["tail_users"]) == (0, 1, 1)


# --- user_auc, summarize, per_round ---------------------------------------------------


def test_user_auc_is_pair_weighted():
    # device 7: round 1 AUC 1.0 over 1*2 = 2 pairs, round 2 AUC 0.25 over 2*2 = 4 pairs,
    # round 3 undefined -> (2 * 1.0 + 4 * 0.25) / 6 = 0.5 (the plain mean would be 0.625)
    # device 3: never has a pair -> NaN, but its positive still counts
    records = pd.DataFrame(
        {
            "device_id": [7, 7, 7, 3],
            "auc": [1.0, 0.25, np.nan, np.nan],
            "n_pos": [1, 2, 0, 1],
            "n_neg": [2, 2, 0, 0],
        }
    )
    out = user_auc(records)
    assert list(out.columns) == ["device_id", "auc", "n_pos"]
    assert out["device_id"].tolist() == [3, 7]
    assert np.isnan(out["auc"].iloc[0]) and out["auc"].iloc[1] == pytest.approx(0.5)
    assert out["n_pos"].tolist() == [1, 3]


def test_user_auc_equals_auc_over_within_round_pairs():
    # per-round device AUCs from device_metrics, combined, equal the AUC over the pairs
    # of both rounds (pairs never cross rounds)
    r1 = np.array([[2.0, 1.0, 3.0], [0.0, -1.0, 0.5]])
    r2 = np.array([[1.0, 0.0, 0.0, 2.0]])
    m1 = device_metrics(r1, np.array([0, 0]), 1)
    m2 = device_metrics(r2, np.array([0]), 1)
    records = pd.DataFrame(
        {
            "device_id": [0, 0],
            "auc": [m1["auc"][0], m2["auc"][0]],
            "n_pos": [m1["n_pos"][0], m2["n_pos"][0]],
            "n_neg": [m1["n_neg"][0], m2["n_neg"][0]],
        }
    )
    # round 1: 2.0 beats 1.0, -1.0, 0.5 (3 of 4); 0.0 beats -1.0 (1 of 4) -> 4 of 8
    # round 2: 1.0 beats 0.0 twice (2 of 3)                               -> 6 / 11
    assert user_auc(records)["auc"].iloc[0] == pytest.approx(6 / 11)


def _records() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "device_id": [0, 1, 0, 2, 3],
            "round": [0, 0, 1, 1, 1],
            "auc": [0.8, 0.5, 0.6, np.nan, 0.9],
            "ndcg10": [1.0, 0.0, 0.25, np.nan, 0.5],
            "hr10": [1.0, 0.0, 0.5, np.nan, 1.0],
            "logloss": [0.5, 0.7, 0.8, np.nan, 0.3],
            "n_pos": [1, 1, 2, 0, 1],
            "n_neg": [4, 4, 8, 0, 4],
            "bucket": ["head", "torso", "head", "tail", "tail"],
        }
    )


def test_summarize_hand_example():
    # user AUCs: device 0 (0.8 * 4 + 0.6 * 16) / 20 = 0.64; device 1 0.5; device 3 0.9;
    # device 2 has no positives -> left out. Sorted [0.5, 0.64, 0.9]:
    # p10 = 0.5 + 0.2 * 0.14 = 0.528, p90 = 0.64 + 0.8 * 0.26 = 0.848, worst 10 % = 1 user.
    th = {"head_min_interactions": 9, "torso_min_interactions": 4, "tail_max_interactions": 3,
          "head_users": 1, "torso_users": 1, "tail_users": 2}
    out = summarize(_records(), overall_auc=0.7, thresholds=th)
    json.dumps(out, allow_nan=False)  # plain JSON, no NaN
    assert out["overall_auc"] == 0.7
    assert out["uauc"] == pytest.approx((0.64 + 0.5 + 0.9) / 3)
    assert out["user_auc_p10"] == pytest.approx(0.528)
    assert out["user_auc_p50"] == pytest.approx(0.64)
    assert out["user_auc_p90"] == pytest.approx(0.848)
    assert out["user_auc_worst10"] == pytest.approx(0.5)
    # ndcg / hr over the 5 positives; logloss over the 25 candidates
    assert out["ndcg10"] == pytest.approx((1.0 + 2 * 0.25 + 0.0 + 0.5) / 5)
    assert out["hr10"] == pytest.approx((1 + 2 * 0.5 + 0 + 1) / 5)
    assert out["logloss"] == pytest.approx((0.5 * 5 + 0.8 * 10 + 0.7 * 5 + 0.3 * 5) / 25)
    assert out["n_users_evaluated"] == 3 and out["n_positives"] == 5
    assert set(out["by_bucket"]) == {"head", "torso", "tail"}
    head, torso, tail = (out["by_bucket"][b] for b in ("head", "torso", "tail"))
    assert head["uauc"] == pytest.approx(0.64) and head["user_auc_p10"] == pytest.approx(0.64)
    assert head["ndcg10"] == pytest.approx(1.5 / 3) and head["hr10"] == pytest.approx(2 / 3)
    assert head["n_users"] == 1
    assert torso["uauc"] == 0.5 and torso["hr10"] == 0.0
    assert tail["uauc"] == pytest.approx(0.9) and tail["n_users"] == 1 and tail["n_users_auc"] == 1
    # every pooled metric of the one metric list, per bucket too: log loss over candidates
    assert head["logloss"] == pytest.approx((0.5 * 5 + 0.8 * 10) / 15)
    assert torso["logloss"] == pytest.approx(0.7) and tail["logloss"] == pytest.approx(0.3)
    for stats in out["by_bucket"].values():
        assert {"uauc", "user_auc_p10", "user_auc_p50", "user_auc_p90", "ndcg10", "hr10", "n_users"} <= set(stats)
    assert out["bucket_thresholds"] == th


@pytest.mark.parametrize("n_users, worst", [(10, 0.0), (11, 0.05), (3, 0.0)])
def test_summarize_worst10_is_ceil_of_ten_percent(n_users, worst):
    aucs = np.linspace(0.0, 1.0, 11)[:n_users]
    records = pd.DataFrame(
        {
            "device_id": np.arange(n_users), "round": 0, "auc": aucs, "ndcg10": 0.0, "hr10": 0.0,
            "logloss": 1.0, "n_pos": 1, "n_neg": 9, "bucket": "tail",
        }
    )
    out = summarize(records, overall_auc=0.5)
    assert out["user_auc_worst10"] == pytest.approx(worst)
    assert out["by_bucket"]["tail"]["user_auc_worst10"] == pytest.approx(worst)
    assert out["by_bucket"]["head"]["n_users"] == 0 and out["by_bucket"]["head"]["uauc"] is None


def test_summarize_nan_and_bucket_override():
    out = summarize(_records(), overall_auc=float("nan"), buckets={0: "head", 1: "head", 2: "tail", 3: "head"})
    assert out["overall_auc"] is None
    assert "bucket_thresholds" not in out
    assert out["by_bucket"]["head"]["n_users"] == 3
    # tail holds only device 2, which never had a positive
    assert out["by_bucket"]["tail"]["uauc"] is None and out["by_bucket"]["tail"]["n_users"] == 0
    assert out["by_bucket"]["torso"]["n_users"] == 0
    json.dumps(out, allow_nan=False)


def test_per_round():
    pr = per_round(_records())
    assert pr["round"].tolist() == [0, 1]
    # round 0: devices 0, 1; round 1: device 2 has no positives and no AUC
    np.testing.assert_allclose(pr["uauc"], [0.65, 0.75])
    np.testing.assert_allclose(pr["ndcg10"], [0.5, (2 * 0.25 + 0.5) / 3])
    np.testing.assert_allclose(pr["hr10"], [0.5, 2 / 3])
    np.testing.assert_allclose(pr["logloss"], [0.6, (0.8 * 10 + 0.3 * 5) / 15])
    assert list(pr.columns) == ["round", "uauc", "ndcg10", "hr10", "logloss", "n_devices", "n_pos"]
    assert pr["n_devices"].tolist() == [2, 2]
    assert pr["n_pos"].tolist() == [2, 3]


def test_pooled_auc_pairwise_and_sorted_paths_count_the_same_pairs():
    # Devices with few rows are counted pairwise, the rest by one sort: every split of a
    # batch (shuffled owners, ties, float64 logits, devices on both sides) gives the same U.
    from devices import scoring as S

    rng = np.random.default_rng(0)
    for trial in range(24):
        nd = int(rng.integers(1, 200))
        counts = rng.integers(0, 40, nd) if trial % 2 else rng.poisson(1.5, nd)
        owner = np.repeat(np.arange(nd), counts)
        if trial % 3 == 0:
            rng.shuffle(owner)
        c = int(rng.integers(1, 30))
        sc = rng.standard_normal((len(owner), c)).astype(np.float32)
        if trial % 4 == 0:  # many ties
            sc = rng.integers(-3, 3, sc.shape).astype(np.float32)
        if trial % 5 == 0:
            sc = sc.astype(np.float64) + rng.standard_normal(sc.shape) * 1e-12
        n_pos = np.bincount(owner, minlength=nd)
        exact = S._pooled_auc_sorted(sc, owner, nd, n_pos)
        np.testing.assert_array_equal(S._pooled_auc(sc, owner, nd, n_pos), exact)
        # one-row devices from the caller's counts of negatives >= and > the positive
        counts = ((sc[:, 1:] >= sc[:, :1]).sum(1), (sc[:, 1:] > sc[:, :1]).sum(1))
        np.testing.assert_array_equal(S._pooled_auc(sc, owner, nd, n_pos, counts), exact)
    # hand-computed: one device, 2 rows of 1 positive + 2 negatives; positives 1 and 3,
    # negatives {0, 3, 2, 5}: 1 beats 0; 3 beats 0 and 2 and ties 3 -> U = 1 + 2.5 = 3.5
    sc = np.array([[1.0, 0.0, 3.0], [3.0, 2.0, 5.0]], np.float32)
    assert S._pooled_auc(sc, np.array([0, 0]), 1, np.array([2]))[0] == 3.5
