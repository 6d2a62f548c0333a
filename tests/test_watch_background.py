"""ESSWatch(background=True): the worker thread, emission on the training thread, skipping
when busy, close/context manager, failures, leaks, bit-identical training; budget_seconds."""

from __future__ import annotations

import gc
import math
import threading
import time
import tracemalloc
import warnings

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn

import esswatch
from esswatch.layers import SequenceModel
from esswatch.operators import Dense
from esswatch.watch import ESSMeasurementError, ESSWarning
from esswatch.watch.budget import Budget
from esswatch.watch.measure import MeasureConfig

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB, D, L, B = 11, 16, 12, 4


def make_model(seed=0, mixer="attention", n_layers=2, **kw):
    torch.manual_seed(seed)
    kw = kw or ({"n_heads": 2} if mixer in ("attention", "gla") else {})
    return SequenceModel(VOCAB, d_model=D, n_layers=n_layers, mixer=mixer, **kw)


def batches(n, seed=1, length=L, rows=B):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (rows, length), generator=g) for _ in range(n)]


def train_step(model, opt, x):
    logits = model(x)
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    opt.zero_grad()


def read_events(logdir):
    ea = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0, "histograms": 0})
    ea.Reload()
    return ea


def settle(watch):
    """Wait (on the worker's condition, no sleeps) until the background job finished."""
    if watch._offload is not None:
        assert watch._offload.worker.wait_idle(timeout=60)


def run(background, logdir, steps=13, every=3, mixer="attention", **kw):
    model = make_model(mixer=mixer)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    results = []
    watch = esswatch.ESSWatch(
        model, logdir=str(logdir), every_n_steps=every, background=background, sinks=[results.append], **kw
    )
    with watch:
        for x in batches(steps):
            train_step(model, opt, x)
            settle(watch)  # the worker is idle before the next sample: nothing is skipped
            watch.step()
    return model, watch, results


# -- values -----------------------------------------------------------------------------
@pytest.mark.parametrize("mixer", ["attention", "gla"])
def test_background_writes_the_values_blocking_mode_writes(tmp_path, mixer):
    _, wb, res_b = run(False, tmp_path / "block", mixer=mixer, metrics=("entropy", "tolerance"))
    _, wg, res_g = run(True, tmp_path / "bg", mixer=mixer, metrics=("entropy", "tolerance"))
    assert wb.background is False and wg.background is True
    assert [r["step"] for r in res_b] == [r["step"] for r in res_g] == [0, 3, 6, 9, 12]
    for rb, rg in zip(res_b, res_g):
        assert rb["layers"].keys() == rg["layers"].keys()
        for name in rb["layers"]:
            for m in ("entropy", "tolerance"):
                for k in ("avg", "max", "total", "utilization"):
                    assert rg["layers"][name][m][k] == pytest.approx(rb["layers"][name][m][k], rel=1e-5, abs=1e-5)
                assert rg["layers"][name][m]["per_index"] == pytest.approx(
                    rb["layers"][name][m]["per_index"], rel=1e-5, abs=1e-5
                )
    lb, lg = wb.latest(), wg.latest()
    assert lb["step"] == lg["step"] == 12
    skip = {"ess/measure_seconds"}
    assert {k: v for k, v in lg["scalars"].items() if k not in skip} == pytest.approx(
        {k: v for k, v in lb["scalars"].items() if k not in skip}, rel=1e-5, abs=1e-5
    )
    assert lg["skipped_samples"] == 0 and lg["scalars"]["ess/skipped"] == 0.0
    ea_b, ea_g = read_events(tmp_path / "block"), read_events(tmp_path / "bg")
    tags = set(ea_b.Tags()["scalars"]) - skip
    assert tags == set(ea_g.Tags()["scalars"]) - skip
    assert "ess/skipped" in tags and f"ess/{'entropy'}/avg/blocks.1.mixer" in tags
    for tag in tags:
        eb, eg = ea_b.Scalars(tag), ea_g.Scalars(tag)
        assert [e.step for e in eb] == [e.step for e in eg] == [0, 3, 6, 9, 12]
        for a, b in zip(eb, eg):
            assert math.isclose(a.value, b.value, rel_tol=1e-5, abs_tol=1e-5), (tag, a, b)


def test_background_default_follows_the_device():
    model = make_model()
    with esswatch.ESSWatch(model) as w:
        assert w.background is False and w._offload is None
    with esswatch.ESSWatch(model, background=True) as w:
        assert w.config()["background"] is True
    with pytest.raises(ValueError, match="background"):
        esswatch.ESSWatch(model, background="yes")


def test_results_are_emitted_from_the_training_thread_with_their_step(tmp_path):
    threads = []
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = esswatch.ESSWatch(
        model,
        every_n_steps=2,
        background=True,
        sinks=[lambda r: threads.append((threading.current_thread(), r["step"]))],
    )
    worker = watch._offload.worker.thread
    assert worker.daemon and worker is not threading.main_thread()
    for s, x in enumerate(batches(7)):
        train_step(model, opt, x)
        settle(watch)
        out = watch.step()
        if s == 0:
            assert out is None  # handed over: not measured yet
    watch.close()
    assert [s for _, s in threads] == [0, 2, 4, 6]
    assert all(t is threading.main_thread() for t, _ in threads)
    assert watch.latest()["step"] == 6
    assert not worker.is_alive() or worker.join(timeout=10) is None
    worker.join(timeout=10)
    assert not worker.is_alive()


# -- a layer whose measurement blocks or fails on the worker --------------------------------
class GateOp(Dense):
    """A dense operator whose validation waits for ``gate`` (the worker blocks deterministically)
    or raises ``fail``."""

    def __init__(self, t, gate=None, fail=None):
        super().__init__(t)
        self.gate, self.fail = gate, fail

    def validate(self):
        if self.fail is not None:
            raise self.fail
        if self.gate is not None and not self.gate.wait(timeout=60):
            raise TimeoutError("gate never opened")
        super().validate()


class GatedMixer(nn.Module):
    def __init__(self, gate=None, fail=None):
        super().__init__()
        self.lin = nn.Linear(D, D)
        self.gate, self.fail = gate, fail

    def forward(self, x):
        return self.lin(x)

    def esswatch_operator(self, args, kwargs, output):
        x = args[0]
        s = torch.tril(torch.softmax(x @ x.transpose(-1, -2), -1))
        return GateOp(s.detach(), self.gate, self.fail)


class GatedModel(nn.Module):
    def __init__(self, gate=None, fail=None):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, D)
        self.mixer = GatedMixer(gate, fail)
        self.out = nn.Linear(D, VOCAB)

    def forward(self, x):
        return self.out(self.mixer(self.embed(x)))


def hold_worker(watch):
    """Test-only: the worker waits at its next job until the returned event is set."""
    gate = threading.Event()
    worker = watch._offload.worker
    run_job = worker._fn
    worker._fn = lambda job: run_job(job) if gate.wait(timeout=60) else None
    return gate


def penalized_step(model, opt, watch, x):
    """One training step with the regularizer's penalty in the loss, then ``watch.step()``."""
    logits = model(x)
    loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    (loss + watch.penalty()).backward()
    opt.step()
    opt.zero_grad()
    watch.step()


def test_held_penalties_go_out_at_once_past_the_cap(monkeypatch):
    """Past ``MAX_HELD`` penalty-only results, the held ones are emitted at once (in step order)
    instead of waiting for the outstanding sample: what waits stays bounded."""
    from esswatch.watch import offload

    monkeypatch.setattr(offload, "MAX_HELD", 2)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []
    watch = esswatch.ESSWatch(model, every_n_steps=1, background=True, regularizer=0.1, sinks=[seen.append])
    gate = hold_worker(watch)
    for x in batches(5):  # step 0 holds the worker; steps 1-4 are skipped
        penalized_step(model, opt, watch, x)
        if len(seen) == 0:
            assert len(watch._offload.held) <= 2
    assert [r["step"] for r in seen] == [1, 2, 3]  # the third held one overflowed the cap of 2
    gate.set()
    watch.close()
    assert [r["step"] for r in seen] == [1, 2, 3, 0, 4]


def test_a_sample_due_while_the_worker_is_busy_is_skipped_and_counted(tmp_path):
    gate = threading.Event()
    model = GatedModel(gate)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = esswatch.ESSWatch(model, logdir=str(tmp_path), every_n_steps=1, background=True, indices=3)
    data = batches(6)
    for s in range(4):  # step 0 blocks the worker; 1, 2, 3 are skipped
        train_step(model, opt, data[s])
        assert watch.step() is None
    assert watch._skipped_samples == 3 and watch.latest() is None
    gate.set()
    settle(watch)
    train_step(model, opt, data[4])
    r = watch.step()  # collects step 0, hands over step 4
    assert r["step"] == 0 and r["skipped_samples"] == 3 and r["scalars"]["ess/skipped"] == 3.0
    watch.close()  # waits for step 4
    assert watch.latest()["step"] == 4
    ea = read_events(tmp_path)
    assert [(e.step, e.value) for e in ea.Scalars("ess/skipped")] == [(0, 3.0), (4, 3.0)]
    assert [e.step for e in ea.Scalars("ess/entropy/avg/mixer")] == [0, 4]
    assert watch.state_dict()["skipped_samples"] == 3


def test_close_waits_for_the_outstanding_sample():
    gate = threading.Event()
    model = GatedModel(gate)
    seen = []
    watch = esswatch.ESSWatch(model, every_n_steps=5, background=True, sinks=[seen.append], indices=2)
    model(batches(1)[0])
    watch.step()
    assert watch._offload.worker.busy() and not seen
    threading.Timer(0.2, gate.set).start()  # opens later; close() must wait for it
    watch.close()
    assert [r["step"] for r in seen] == [0] and watch.latest()["step"] == 0
    watch.close()  # idempotent


def test_context_manager_emits_the_last_sample():
    model = make_model()
    seen = []
    with esswatch.ESSWatch(model, every_n_steps=2, background=True, sinks=[seen.append]) as watch:
        for x in batches(5):
            model(x)
            settle(watch)
            watch.step()
    assert [r["step"] for r in seen] == [0, 2, 4]
    assert watch._closed and not watch.capture.attached


def test_a_failure_on_the_worker_warns_on_the_training_thread_naming_the_layer():
    model = GatedModel(fail=RuntimeError("boom"))
    caught = []
    watch = esswatch.ESSWatch(model, every_n_steps=1, background=True)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for x in batches(4):
            model(x)
            settle(watch)
            watch.step()
        watch.close()
        caught = [x for x in w if issubclass(x.category, ESSWarning) and "skipped layer" in str(x.message)]
    assert len(caught) == 1 and "'mixer'" in str(caught[0].message) and "boom" in str(caught[0].message)
    assert watch.failures == 4 and watch.latest()["failures"] == 4


def test_strict_raises_at_collection():
    model = GatedModel(fail=RuntimeError("boom"))
    watch = esswatch.ESSWatch(model, every_n_steps=1, background=True, strict=True)
    model(batches(1)[0])
    watch.step()  # handed over: no error yet
    settle(watch)
    model(batches(1)[0])
    with pytest.raises(ESSMeasurementError, match="'mixer'.*step 0"):
        watch.step()  # and step 1 is still handed over: its sample fails too, raised when close() collects it
    with pytest.raises(ESSMeasurementError, match="'mixer'.*step 1"):
        watch.close()
    assert watch.global_step == 2


# -- training is untouched ------------------------------------------------------------------
def _train(watch_kwargs, steps=12):
    model = make_model(mixer="attention")
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(123)
    watch = esswatch.ESSWatch(model, **watch_kwargs) if watch_kwargs is not None else None
    for x in batches(steps):
        x = x[:, torch.randperm(L)]  # consumes the global RNG every step
        train_step(model, opt, x)
        if watch is not None:
            watch.step()
    if watch is not None:
        watch.close()
    return model, torch.get_rng_state(), torch.rand(3)


def test_training_is_bit_identical_and_the_rng_stream_unchanged_with_background():
    threads = torch.get_num_threads()
    ref_model, ref_rng, ref_next = _train(None)
    model, rng, nxt = _train({"every_n_steps": 1, "background": True, "estimator": "randomized"})
    for (n, a), (_, b) in zip(ref_model.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), n
    assert torch.equal(ref_rng, rng) and torch.equal(ref_next, nxt)
    assert torch.get_num_threads() == threads


def test_no_leak_over_2000_sampled_steps():
    """2,000 sampled steps after a warm-up: no live tensor more, no thread more, and Python's
    allocations flat. Those grow by about 100 KiB while caches warm up and then level off (86,
    95, 100, 102, 103 KiB after 1,800, 3,600, ... steps in one run), so the test compares the
    second 1,000 steps with the first: a leak grows in both, warm-up only in the first."""
    torch.manual_seed(0)
    model = SequenceModel(VOCAB, d_model=8, n_layers=1, mixer="attention", n_heads=2)
    x = torch.randint(0, VOCAB, (2, 8))
    watch = esswatch.ESSWatch(model, every_n_steps=1, background=True, indices=2, histograms=False, images=False)
    threads0 = threading.active_count()

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor))

    def run(n):
        with torch.no_grad():
            model.train()
            for _ in range(n):
                model(x)
                watch.step()
        settle(watch)
        run_one()

    def run_one():  # collect the last one
        with torch.no_grad():
            model(x)
            watch.step()
        settle(watch)

    run(400)
    tracemalloc.start()
    try:
        gc.collect()
        base_py = tracemalloc.get_traced_memory()[0]
        base_tensors = live_tensors()
        n0 = watch._samples + watch._skipped_samples
        run(1000)
        gc.collect()
        mid_py = tracemalloc.get_traced_memory()[0]
        run(1000)
        gc.collect()
        py = tracemalloc.get_traced_memory()[0]
        tensors = live_tensors()
    finally:
        tracemalloc.stop()
    emitted = watch._samples
    handled = watch._samples + watch._skipped_samples - n0
    watch.close()
    assert threading.active_count() <= threads0
    assert handled >= 1990  # every sampled step measured or skipped
    assert emitted > 10
    assert tensors <= base_tensors + 2
    assert py - mid_py < 48 * 1024, f"Python allocations grew by {(py - mid_py) / 1024:.0f} KiB in steps 1,000-2,000"
    assert py - base_py < 256 * 1024, f"Python allocations grew by {(py - base_py) / 1024:.0f} KiB"


# -- budget_seconds ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "1"])
def test_budget_seconds_is_validated(bad):
    with pytest.raises(ValueError, match="budget_seconds"):
        esswatch.ESSWatch(make_model(), budget_seconds=bad)


def _timings(t_one, t_full, rows=4, heads=8, L=256, n=16):
    from esswatch.watch.measure import select_indices

    return {
        "a": {
            "seq_len": L,
            "rows": rows,
            "heads": heads,
            "indices": select_indices(n, L),
            "one": select_indices(1, L),
            "t_one": t_one,
            "t_full": t_full,
            "type": "SoftmaxAttention",
        }
    }


def test_budget_ladder_cuts_rows_then_indices_then_heads():
    cfg = MeasureConfig(indices=16)
    b = Budget(1.0)
    lvl = b.decide(_timings(0.25, 1.5), cfg, 1.6)  # a 2x cut: rows only
    assert lvl["cut"] == ["batch_rows"] and lvl["batch_rows"] == 2 and lvl["indices"] == 16
    assert lvl["predicted_seconds"] <= 0.8
    b = Budget(1.0)
    lvl = b.decide(_timings(1.5, 8.0), cfg, 8.0)  # rows down to 1, then indices
    assert lvl["batch_rows"] == 1 and lvl["cut"] == ["batch_rows", "indices"] and lvl["indices"] < 16
    assert lvl["heads"] == 8
    b = Budget(1.0)
    lvl = b.decide(_timings(10.0, 40.0), cfg, 40.0)  # a large fixed part: heads too
    assert lvl["cut"] == ["batch_rows", "indices", "heads"] and lvl["indices"] == 1 and lvl["heads"] < 8
    assert lvl["predicted_seconds"] <= 0.8
    b = Budget(1.0)
    lvl = b.decide(_timings(0.01, 0.5), cfg, 0.5)  # within budget: nothing cut
    assert lvl["cut"] == [] and lvl["batch_rows"] == 4 and lvl["indices"] == 16 and lvl["heads"] == 8
    b = Budget(1e-6)
    lvl = b.decide(_timings(1.0, 2.0), cfg, 2.0)
    assert lvl["batch_rows"] == lvl["heads"] == lvl["indices"] == 1 and "cannot be met" in b.warning


@pytest.mark.parametrize("t_one,t_full", [(0.25, 1.5), (1.5, 8.0), (0.3, 3.1), (10.0, 40.0), (0.05, 50.0)])
def test_budget_takes_the_largest_level_within_target(t_one, t_full):
    """The chosen level is predicted within 0.8 b and the ladder's level just above it (one more
    row, index or head) is predicted over it: the budget is used, not halved away."""
    from esswatch.watch.budget import TARGET

    cfg, timings = MeasureConfig(indices=16), _timings(t_one, t_full)
    b = Budget(1.0)
    lvl = b.decide(timings, cfg, t_full)
    ladder = b._ladder(timings)
    level = (
        lvl["batch_rows"],
        lvl["indices"] if isinstance(lvl["indices"], int) else len(lvl["indices"]),
        lvl["heads"],
    )
    j = ladder.index(level)
    assert j > 0 and b.predict(timings, cfg, ladder[j - 1]) > TARGET * b.seconds
    assert lvl["predicted_seconds"] == pytest.approx(b.predict(timings, cfg, level))
    assert lvl["predicted_seconds"] <= TARGET * b.seconds
    # consecutive levels differ by one row, index or head: the predicted time drops by a small step
    assert all(sum(x != y for x, y in zip(a, c)) == 1 for a, c in zip(ladder, ladder[1:]))
    assert all(sum(abs(x - y) for x, y in zip(a, c)) == 1 for a, c in zip(ladder, ladder[1:]))


@pytest.mark.parametrize("background", [False, True])
def test_budget_fixes_a_smaller_measurement_after_the_first_sample(background):
    """Full measurement (4 rows x 4 heads x 24 exact indices at L = 256) is far over a 0.02 s budget
    (0.2 s on a recent 2-core CPU, one thread): the level cuts, stays fixed, is in latest() and the
    config, and later samples are far cheaper."""
    torch.manual_seed(0)
    model = SequenceModel(VOCAB, d_model=32, n_layers=1, mixer="attention", n_heads=4)
    budget = 0.02
    seen = []
    watch = esswatch.ESSWatch(
        model,
        every_n_steps=1,
        background=background,
        batch_rows=4,
        indices=24,
        estimator="exact",
        budget_seconds=budget,
        sinks=[seen.append],
        histograms=False,
    )
    data = batches(4, length=256)
    for x in data:
        model(x)
        settle(watch)
        watch.step()
    watch.close()
    first, later = seen[0], seen[1:]
    lvl = first["budget"]
    assert first["seconds"] > 3 * budget  # the premise: the full measurement is far over the budget
    assert lvl["cut"] and lvl["cut"][0] == "batch_rows"
    assert lvl["predicted_seconds"] <= 0.8 * budget
    assert lvl == watch.latest()["budget"] == watch.config()["budget"]
    assert watch.config()["budget_seconds"] == budget
    assert first["layers"]["blocks.0.mixer"]["rows"] == 4 and len(first["layers"]["blocks.0.mixer"]["indices"]) == 24
    assert later, "no sample after the first"
    for r in later:
        lay = r["layers"]["blocks.0.mixer"]
        assert lay["rows"] == lvl["batch_rows"] and lay["heads"] == min(4, lvl["heads"])
        assert len(lay["indices"]) == (lvl["indices"] if isinstance(lvl["indices"], int) else 24)
        assert r["budget"] == lvl
        # a loose bound (the real timing is in examples/benchmarks/scale.py): far below the first sample
        assert r["seconds"] < max(3 * budget, first["seconds"] / 3)


def test_budget_cut_of_an_explicit_list_fits_shorter_sequences():
    """Regression: a budget that cut indices=[4, 8, 40, 50] to one kept [40], so a later batch of 16 tokens
    had no index left and every layer failed (without a budget it measures [4, 8]). The cut is now one of the
    listed indices that fit each sequence; the values are those of entropy_ess at that index."""
    torch.manual_seed(0)
    model = SequenceModel(VOCAB, d_model=16, n_layers=1, mixer="attention", n_heads=2)
    watch = esswatch.ESSWatch(model, every_n_steps=1, indices=[4, 8, 40, 50], budget_seconds=1e-6, batch_rows=1)
    got = []
    for length in (64, 64, 16, 12):
        x = torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(length))
        model(x)
        got.append(watch.step())
    watch.close()
    assert [r["failures"] for r in got] == [0, 0, 0, 0]
    assert [r["layers"]["blocks.0.mixer"]["indices"] for r in got] == [[4, 8, 40, 50], [40], [8], [8]]
    with esswatch.capture(model) as cap:
        model(torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(12)))
    (op,) = cap.operators.values()
    ref = float(esswatch.entropy_ess(op.narrowed(1, 1), [8]).mean())
    assert got[-1]["layers"]["blocks.0.mixer"]["entropy"]["avg"] == pytest.approx(ref, rel=1e-6)


def test_budget_level_survives_a_resume():
    """Regression: state_dict() did not hold the budget's level, so a resumed watch measured its first sample
    at full size again (a spike in the curves) and decided anew. Now the level comes back with the state
    (same budget_seconds): the first sample after the resume is at the level, with no new timing; another
    budget decides its own."""
    torch.manual_seed(0)
    model = SequenceModel(VOCAB, d_model=32, n_layers=1, mixer="attention", n_heads=4)
    opts = dict(every_n_steps=1, batch_rows=4, indices=24, estimator="exact", histograms=False)
    data = batches(3, length=128)
    seen = []
    watch = esswatch.ESSWatch(model, budget_seconds=1e-6, sinks=[seen.append], **opts)
    for x in data[:2]:
        model(x)
        watch.step()
    state = watch.state_dict()
    watch.close()
    lvl = seen[0]["budget"]
    assert lvl["cut"] == ["batch_rows", "indices", "heads"] and state["budget"] == lvl
    resumed = []
    watch = esswatch.ESSWatch(model, budget_seconds=1e-6, sinks=[resumed.append], **opts)
    watch.load_state_dict(state)
    assert watch.config()["budget"] == lvl
    model(data[2])
    watch.step()
    watch.close()
    (r,) = resumed
    lay = r["layers"]["blocks.0.mixer"]
    assert r["step"] == 2 and r["budget"] == lvl
    assert (lay["rows"], lay["heads"], len(lay["indices"])) == (1, 1, 1)
    other = esswatch.ESSWatch(model, budget_seconds=2.0, **opts)  # another budget: nothing restored
    other.load_state_dict(state)
    assert other.config()["budget"] is None and other.capture.batch_rows == 4
    other.close()
    with pytest.raises(ValueError, match="budget.heads"):
        esswatch.ESSWatch(model, **opts).load_state_dict(dict(state, budget=dict(lvl, heads=0)))


def test_state_dict_includes_the_outstanding_background_sample():
    """Regression: with background=True a state_dict() taken while a sample was on the worker (as a checkpoint
    saved right after a sampled step) held neither that sample nor, for the first one, the budget's level, so a
    resume timed a full-size first sample again. state_dict() now emits the outstanding sample first (flush),
    from the training thread: the state counts every sample taken, and the results are the blocking mode's."""
    torch.manual_seed(0)
    model = SequenceModel(VOCAB, d_model=32, n_layers=1, mixer="attention", n_heads=4)
    opts = dict(every_n_steps=2, batch_rows=4, indices=24, estimator="exact", histograms=False)
    data = batches(3, length=128)
    states, seen = {}, {}
    for background in (False, True):
        seen[background] = []
        watch = esswatch.ESSWatch(model, background=background, sinks=[seen[background].append], **opts)
        for x in data:
            model(x)
            settle(watch)  # the previous sample is done: none is skipped as busy
            watch.step()
        states[background] = watch.state_dict()  # step 2's sample may still be on the worker
        assert [r["step"] for r in seen[background]] == [0, 2]  # emitted by now, on this thread
        watch.close()
    assert states[True] == states[False] and states[True]["samples"] == 2
    for a, b in zip(seen[True], seen[False]):
        assert a["scalars"]["ess/entropy/avg/model"] == pytest.approx(b["scalars"]["ess/entropy/avg/model"], rel=1e-6)
    # the budget's level, decided from the first sample, is in a state taken while that sample was outstanding
    first = []
    watch = esswatch.ESSWatch(model, background=True, budget_seconds=1e-6, sinks=[first.append], **opts)
    model(data[0])
    watch.step()
    state = watch.state_dict()
    watch.close()
    assert state["samples"] == 1 and state["budget"] == first[0]["budget"] and state["budget"] is not None
    blocking = esswatch.ESSWatch(model, background=False)
    assert blocking.flush() is None  # nothing to wait for
    blocking.close()


# -- CUDA -------------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("transfer", ["device", "host"])
def test_cuda_background_values_equal_blocking(transfer):
    def go(background):
        model = make_model().cuda()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        seen = []
        watch = esswatch.ESSWatch(model, every_n_steps=2, background=background, sinks=[seen.append])
        if background:
            watch._offload.copier.transfer = transfer
        for x in batches(7):
            train_step(model, opt, x.cuda())
            settle(watch)
            watch.step()
        watch.close()
        return watch, seen, model

    wb, rb, mb = go(False)
    wg, rg, mg = go(True)
    assert wg.background
    with esswatch.ESSWatch(make_model().cuda()) as w:
        assert w.background
    assert [r["step"] for r in rb] == [r["step"] for r in rg] == [0, 2, 4, 6]
    for a, b in zip(rb, rg):
        for tag, v in a["scalars"].items():
            if tag != "ess/measure_seconds":
                assert b["scalars"][tag] == pytest.approx(v, rel=1e-5, abs=1e-5), tag
    for p, q in zip(mb.parameters(), mg.parameters()):
        assert torch.equal(p, q)


_EXIT_SCRIPT = """
import threading, time, torch, esswatch
import esswatch.watch.background as bg
from torch import nn
from esswatch.operators import Dense
torch.set_num_threads(1)
bg.EXIT_WAIT_SECONDS = {wait}
never = threading.Event()

class Busy(Dense):
    def validate(self):
        if {stuck}:
            never.wait()
        t0 = time.perf_counter()
        x = torch.ones(32, 32)
        while time.perf_counter() - t0 < 1.0:  # many short torch calls: the worker is in C++ most of the time
            x = torch.tanh(x @ x)

class Mixer(nn.Module):
    def forward(self, x):
        return x
    def esswatch_operator(self, args, kwargs, output):
        return Busy(torch.eye({L}))

model = nn.Sequential(Mixer(), Mixer())
watch = esswatch.ESSWatch(model, every_n_steps=1, background=True, indices=2)
model(torch.zeros(2, {L}, 4))
watch.step()
time.sleep(0.2)
print("handed over", watch._offload.worker.busy(), flush=True)
"""


def _exit_without_close(stuck: bool, wait: float):
    import subprocess
    import sys

    code = _EXIT_SCRIPT.format(stuck=stuck, wait=wait, L=L)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return out, time.perf_counter() - t0


def test_interpreter_exit_with_the_worker_inside_torch_calls_exits_cleanly():
    """A script that never calls close() while the worker runs torch calls: CPython ends daemon
    threads at finalization, which inside a torch call aborted the process (SIGABRT, "terminate
    called without an active exception") in about half the runs before the exit handler. Now the
    job is cancelled before its next layer, the handler waits for it, warns, and the exit is clean."""
    for _ in range(3):
        out, seconds = _exit_without_close(stuck=False, wait=30.0)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "handed over True"
        assert "background sample of step 0" in out.stderr and "it was dropped" in out.stderr, out.stderr
        assert "terminate called" not in out.stderr
        assert seconds < 30  # one layer's busy second, not the second layer's (cancelled), not the wait bound


def test_interpreter_exit_without_close_does_not_hang():
    """A measurement stuck forever (in Python code) does not hold the exit beyond EXIT_WAIT_SECONDS."""
    out, seconds = _exit_without_close(stuck=True, wait=1.0)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "handed over True"
    assert "did not stop within 1 s" in out.stderr, out.stderr
    assert seconds < 60


def test_a_watch_dropped_without_close_lets_its_worker_exit():
    model = make_model()
    watch = esswatch.ESSWatch(model, every_n_steps=1, background=True)
    worker = watch._offload.worker.thread
    watch.capture.detach()  # (what close() would also do; keeps the model reusable)
    del watch
    gc.collect()
    worker.join(timeout=30)
    assert not worker.is_alive()


def _run_variant(background, **kw):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    seen = []
    with esswatch.ESSWatch(model, every_n_steps=2, background=background, sinks=[seen.append], **kw) as watch:
        for x in batches(5):
            logits = model(x)
            loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
            loss = loss + watch.penalty()
            loss.backward()
            opt.step()
            opt.zero_grad()
            settle(watch)
            watch.step()
    return seen, model


@pytest.mark.parametrize(
    "kw", [{"probe_batch": batches(1, seed=7)[0]}, {"regularizer": 0.1}], ids=["probe_batch", "regularizer"]
)
def test_probe_batch_and_regularizer_with_background_match_blocking(kw):
    rb, mb = _run_variant(False, **kw)
    rg, mg = _run_variant(True, **kw)
    assert [r["step"] for r in rb] == [r["step"] for r in rg] == [0, 2, 4]
    for a, b in zip(rb, rg):
        assert a["source"] == b["source"]
        for tag, v in a["scalars"].items():
            if tag != "ess/measure_seconds":
                assert b["scalars"][tag] == pytest.approx(v, rel=1e-5, abs=1e-5), tag
        if "regularizer" in kw:
            assert b["penalty"]["total"] == pytest.approx(a["penalty"]["total"], rel=1e-6)
    for p, q in zip(mb.parameters(), mg.parameters()):  # the penalty's gradient is the same
        assert torch.equal(p, q)


def test_a_skipped_sample_still_logs_the_regularizers_penalty(tmp_path):
    """The penalty of a step whose sample was skipped is logged at that step, with the values
    the blocking mode logs (read back from both runs' TensorBoard files), and every series is
    written in the order of its steps (the penalty-only results wait for step 0's result)."""
    logged = {}
    for background in (False, True):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        seen = []
        logdir = tmp_path / str(background)
        watch = esswatch.ESSWatch(
            model, logdir=str(logdir), every_n_steps=1, background=background, regularizer=0.1, sinks=[seen.append]
        )
        # the worker holds step 0 until the loop is over: steps 1-3 are skipped
        gate = hold_worker(watch) if background else threading.Event()
        for x in batches(4):
            penalized_step(model, opt, watch, x)
        gate.set()
        watch.close()
        ea = read_events(logdir)
        logged[background] = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
        if background:
            # step 0 at close(); the penalty-only results of steps 1-3 held behind it, in step order
            assert [r["step"] for r in seen] == [0, 1, 2, 3]
            assert all(r["layers"] == {} and "seconds" not in r for r in seen[1:])
            assert [r["skipped_samples"] for r in seen] == [3, 3, 3, 3]  # skipped before each was emitted
            assert watch.latest()["step"] == 0 and watch.state_dict()["samples"] == 1
    blocking, background = logged[False], logged[True]
    pen = [t for t in blocking if t.startswith("ess/penalty/")]
    assert len(pen) == 3  # total and both layers
    for tag in pen:
        assert [s for s, _ in blocking[tag]] == [0, 1, 2, 3]
        got = background[tag]  # in the order written: the steps increase
        assert [s for s, _ in got] == [0, 1, 2, 3]
        assert [v for _, v in got] == pytest.approx([v for _, v in blocking[tag]], rel=1e-6)
    assert background["ess/skipped"] == [(0, 3.0), (1, 3.0), (2, 3.0), (3, 3.0)]
    measured = [t for t in background if t.startswith("ess/entropy/avg/")]
    assert measured and all([s for s, _ in background[t]] == [0] for t in measured)
    assert [s for s, _ in background["ess/failures"]] == [0]


def test_report_on_a_run_with_penalty_only_steps(tmp_path, capsys):
    """``esswatch report`` on a background run whose last steps logged only the penalty: it reports
    each layer at the last step with ESS values (read back from the event files with
    ``EventAccumulator``) and the trend from the measured step before it, not at the later
    penalty-only steps."""
    import json

    from esswatch.cli import main

    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    watch = esswatch.ESSWatch(model, logdir=str(tmp_path), every_n_steps=1, background=True, regularizer=0.1)
    gates = [threading.Event(), threading.Event()]
    jobs = iter(range(10))
    worker = watch._offload.worker
    run_job = worker._fn
    worker._fn = lambda job: run_job(job) if gates[min(next(jobs), 1)].wait(timeout=60) else None
    data = batches(6)
    for s in range(6):  # measured: 0 and 3; penalty only: 1, 2 (held behind 0), 4, 5 (behind 3)
        if s == 3:
            gates[0].set()
            settle(watch)
        penalized_step(model, opt, watch, data[s])
    gates[1].set()
    watch.close()
    ea = read_events(tmp_path)
    avg_tags = [t for t in ea.Tags()["scalars"] if t.startswith("ess/entropy/avg/")]
    assert avg_tags and all([e.step for e in ea.Scalars(t)] == [0, 3] for t in avg_tags)
    assert [e.step for e in ea.Scalars("ess/penalty/total")] == [0, 1, 2, 3, 4, 5]
    assert main(["report", str(tmp_path), "--json", "--last", "2"]) == 0
    (run,) = json.loads(capsys.readouterr().out)
    table = run["metrics"]["entropy"]
    assert sorted(f"ess/entropy/avg/{layer}" for layer in table) == sorted(avg_tags)
    for layer, row in table.items():
        ev = ea.Scalars(f"ess/entropy/avg/{layer}")
        assert row["step"] == 3
        assert row["avg"] == ev[-1].value
        assert row["trend_avg"] == pytest.approx(ev[-1].value - ev[0].value)
        for stat in ("max", "total", "utilization"):
            assert row[stat] == ea.Scalars(f"ess/entropy/{stat}/{layer}")[-1].value
    assert run["failures"] == 0


def test_close_while_handling_an_exception_under_reduce_drops_the_outstanding_sample(monkeypatch):
    """Regression (DDP review): an exception on one rank (a user error in training_step) closed the watch
    (Lightning's on_exception, a `with` block), whose background sample then entered its all_reduce while the other
    rank was in DDP's gradient all_reduce: gloo aborted with a collective mismatch and the user's error vanished.
    Closed while an exception is being handled, under reduce with several ranks, the outstanding sample is now
    dropped without any collective; closed normally it is still reduced and emitted. (Two ranks are simulated:
    world_size patched to 2, the reduction recorded.)"""
    import esswatch.watch.distributed as dist_utils

    def run(in_except):
        seen, reduced = [], []
        model = make_model()
        watch = esswatch.ESSWatch(model, every_n_steps=1, background=True, reduce=True, sinks=[seen.append])
        model(batches(1)[0])
        watch.step()  # step 0's sample is on the worker
        monkeypatch.setattr(dist_utils, "world_size", lambda: 2)
        monkeypatch.setattr(
            dist_utils,
            "reduce_layers",
            lambda layers, names, metrics, failures: reduced.append(1) or (layers, failures),
        )
        try:
            if in_except:
                try:
                    raise RuntimeError("user error")
                except RuntimeError:
                    watch.close()
            else:
                watch.close()
        finally:
            monkeypatch.undo()
        return seen, reduced

    assert run(True) == ([], [])
    seen, reduced = run(False)
    assert reduced == [1] and [r["step"] for r in seen] == [0]


def test_a_sink_that_calls_state_dict_keeps_every_sink_in_step_order():
    """Regression (review of this release): state_dict() flushes an outstanding sample, and a sink that called it
    (to checkpoint beside each result) emitted from inside the emission of an earlier result: a penalty-only result
    held behind it reached the other sinks before the result being emitted (steps out of order). From inside a sink
    state_dict() no longer flushes."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    seen_a, seen_b, states = [], [], []
    holder = {}

    def sink_a(result):
        seen_a.append(result["step"])
        states.append(holder["watch"].state_dict())

    watch = esswatch.ESSWatch(
        model, every_n_steps=1, background=True, regularizer=1e-2, sinks=[sink_a, lambda r: seen_b.append(r["step"])]
    )
    holder["watch"] = watch
    gate = hold_worker(watch)
    for step, x in enumerate(batches(4)):
        penalized_step(model, opt, watch, x)
        if step == 1:  # step 1 was skipped (busy worker): its penalty-only result is held behind step 0's
            gate.set()
            settle(watch)
    watch.close()
    assert seen_a == seen_b == sorted(seen_a) and seen_a[:2] == [0, 1]
    assert len(states) == len(seen_a)
