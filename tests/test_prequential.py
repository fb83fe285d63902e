"""Prefetched prequential scoring (``devices.prequential``): a host that scores the next
window in the background gives exactly the scores of one that does not, drops a prefetch
that a later state change made stale, and never hides an error behind one."""
from __future__ import annotations

import numpy as np
import pytest

from conftest import SmallWorld, small_config
from devices import prequential
from devices.host import DeviceHost
from devices.pool import shard_of
from devices.runtime import Payload
from strategies import fedavg, local_finetune

ALWAYS_ON = {"online_peak": 1.0, "online_trough": 1.0, "failure_rate": 0.0}


def _same(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if k == "histogram":
            if not (np.array_equal(a[k].pos, b[k].pos) and np.array_equal(a[k].neg, b[k].neg)):
                return False
        elif not np.array_equal(a[k], b[k], equal_nan=a[k].dtype.kind == "f"):
            return False
    return True


@pytest.fixture(scope="module")
def world():
    return SmallWorld(small_config(data={"n_devices": 40, "n_rounds": 4}, profiles=ALWAYS_ON), n_hosts=1)


def _hosts(w):
    ids = w.pool.hosts[0].device_ids
    make = lambda prefetch: DeviceHost(shard_of(w.fleet.interactions, w.fleet.timeline, ids), w.spec,
                                       w.cfg.device, w.run.seed, prefetch=prefetch)
    plain, ahead = make(False), make(True)
    for h in (plain, ahead):
        h.reset(w.initial)
    return ids, plain, ahead


def _jobs(w, ids, shift: float):
    shifted = {k: (v + np.float32(shift)).astype(np.float32) for k, v in w.initial.items()}
    return [(fedavg.train, Payload(arrays={"arrays": shifted}), ids[:12]),
            (local_finetune.train, Payload(configs={"c": {"local-steps": 2}}), ids[12:30])]


def test_prefetched_scores_equal_scores_computed_in_the_call(world, monkeypatch):
    ids, plain, ahead = _hosts(world)
    taken = []
    real_take = prequential.Prefetch.take
    monkeypatch.setattr(prequential.Prefetch, "take",
                        lambda self, r: taken.append(real_take(self, r)) or taken[-1])
    for r in (1, 2, 3):
        a, b = plain.score(r), ahead.score(r)
        assert len(a["device_id"]) > 0 and _same(a, b)
        plain.run(r, 0, _jobs(world, ids, 0.01 * r))
        ahead.run(r, 0, _jobs(world, ids, 0.01 * r))
        assert ahead._prefetch._job is not None and ahead._prefetch._job.round == r + 1
    a, b = plain.score(4), ahead.score(4)
    assert _same(a, b)
    # round 1 had nothing prefetched; rounds 2-4 were all taken from the prefetch
    assert taken[0] is None and all(t is not None for t in taken[1:]) and len(taken) == 4
    # the last round starts no prefetch: there is no window after it
    ahead.run(4, 0, _jobs(world, ids, 0.05))
    assert ahead._prefetch._job is None


def test_a_second_exchange_makes_the_prefetch_stale(world):
    """The prefetch started after exchange 0 is dropped by exchange 1, which changes what
    the devices hold: the next window is scored on the state exchange 1 left."""
    ids, plain, ahead = _hosts(world)
    for h in (plain, ahead):
        h.score(1)
        h.run(1, 0, _jobs(world, ids, 0.01))
    first = ahead._prefetch._job
    for h in (plain, ahead):
        h.run(1, 1, _jobs(world, ids, 0.5))  # a big shift: stale scores would differ
    assert first.cancelled and ahead._prefetch._job is not first
    a, b = plain.score(2), ahead.score(2)
    assert _same(a, b)
    # what the first prefetch would have given differs: the test can tell stale from fresh
    _, p2, _ = _hosts(world)
    p2.score(1)
    p2.run(1, 0, _jobs(world, ids, 0.01))
    assert not _same(p2.score(2), a)


def test_reset_and_set_state_settle_the_prefetch(world):
    ids, plain, ahead = _hosts(world)
    ahead.score(1)
    state0 = ahead.get_state()
    ahead.run(1, 0, _jobs(world, ids, 0.3))
    ahead.set_state(state0)  # back to before the exchange: the prefetch is stale
    assert ahead._prefetch._job is None
    plain.score(1)
    assert _same(plain.score(2), ahead.score(2))


def test_a_failing_prefetch_is_not_silent(world, monkeypatch):
    """A model that raises in the background raises again in ``score`` itself."""
    ids, _, ahead = _hosts(world)
    ahead.score(1)
    calls = []

    def boom(*a, **k):
        calls.append(1)
        raise RuntimeError("boom in the metrics")

    monkeypatch.setattr(prequential.scoring, "device_metrics", boom)
    ahead.run(1, 0, _jobs(world, ids, 0.01)[:1])
    with pytest.raises(RuntimeError, match="boom in the metrics"):
        ahead.score(2)
    assert len(calls) == 2  # once in the prefetch, once in the call


@pytest.mark.parametrize("ending", ["finished", "cancelled", "failed"])
def test_on_done_runs_however_the_prefetch_ends(world, monkeypatch, ending):
    """A host returns freed memory when its prefetch ends (``free_heap``): the callback
    runs once whether the prefetch finished, was cancelled or raised."""
    import threading

    ids, _, host = _hosts(world)
    host.score(1)
    gate, done = threading.Event(), []
    real = prequential.score_window

    def scored(h, r, check=None):
        gate.wait(5)
        if ending == "failed":
            raise RuntimeError("boom")
        return real(h, r, check)

    monkeypatch.setattr(prequential, "score_window", scored)
    pf = prequential.Prefetch(host, on_done=lambda: done.append(threading.current_thread().name))
    pf.start(2)
    job = pf._job
    if ending == "cancelled":
        pf.settle()  # before it reads the device state: cancelled without waiting
    gate.set()
    job.thread.join(5)
    assert done == ["prefetch-score-2"]
    assert (job.result is not None) == (ending == "finished")


def test_personal_heads_and_patches_score_as_whole_personal_models(world, monkeypatch):
    """Devices whose own parameters sit after the body (a head, a MetaPatch patch) are
    scored with the shared body in large batches and their own head and patch row by
    row: the logits of the per-device forward, to float32 rounding, on two held
    versions; a device with its own body or item table still takes the per-device path."""
    import torch
    from devices import models, scoring

    ids, host, _ = _hosts(world)
    spec, gen = world.spec, torch.Generator().manual_seed(3)
    n = len(ids)
    shifted = {k: (v + np.float32(0.02)).astype(np.float32) for k, v in world.initial.items()}
    host.hold(np.arange(5, 15), shifted)
    rnd = lambda *shape: 0.05 * torch.randn(*shape, generator=gen)
    heads = {k: torch.from_numpy(world.initial[k])[None] + rnd(1, *world.initial[k].shape) for k in spec.head_keys()}
    d = spec.dim
    host.set_personal(np.arange(0, 10), heads)
    host.set_personal(np.arange(10, 20), {"patch.encoder.w": rnd(10, d, d), "patch.encoder.b": rnd(10, d)})
    host.set_personal(np.arange(20, 25), {**heads, "patch.head.1.w": rnd(5, d, d), "patch.head.1.b": rnd(5, d)})
    host.set_personal(np.arange(25, 30), {"item_emb": torch.from_numpy(world.initial["item_emb"])[None] + rnd(1, spec.n_items, d),
                                          "gru.w_hh": torch.from_numpy(world.initial["gru.w_hh"])[None] + rnd(1, d, 3 * d)})
    seen, late_calls = [], []
    real_metrics, real_late = scoring.device_metrics, models.forward_from_body
    monkeypatch.setattr(scoring, "device_metrics", lambda sc, *a: seen.append(sc.copy()) or real_metrics(sc, *a))
    monkeypatch.setattr(models, "forward_from_body", lambda *a: late_calls.append(a[1].shape[0]) or real_late(*a))
    host.score(2)
    assert sum(late_calls) > 0  # the batched path ran ...
    monkeypatch.setattr(prequential, "late_keys", lambda spec: frozenset())
    host.score(2)
    owner = host.eval_samples(2, scored=True).owner
    assert sum(late_calls) == int(np.isin(owner, np.arange(25)).sum())  # ... for the rows of devices 0-24 only
    assert n > 30 and not np.array_equal(seen[0], seen[1])  # another summation order ...
    np.testing.assert_allclose(seen[0], seen[1], rtol=0, atol=2e-5)  # ... the same logits
