"""ESSWatch under DistributedDataParallel: 2 processes, gloo, CPU."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from spawned import run_rank
from torch import nn

VOCAB, L, B, STEPS, EVERY = 11, 12, 4, 5, 2


def _train_step(model, opt, watch, x):
    """One optimizer step of the next-token loss on ``x``, then ``watch.step()`` (its result)."""
    logits = model(x)
    nn.functional.cross_entropy(logits.reshape(-1, VOCAB), x.reshape(-1)).backward()
    opt.step()
    opt.zero_grad()
    return watch.step()


def _worker(rank: int, tmp: str) -> None:
    import esswatch
    from esswatch.layers import SequenceModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        SequenceModel(VOCAB, d_model=16, n_layers=2, mixer="attention", n_heads=2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    seen = []
    watch = esswatch.ESSWatch(
        model, logdir=os.path.join(tmp, "tb"), every_n_steps=EVERY, reduce=True, sinks=[seen.append]
    )
    g = torch.Generator().manual_seed(100 + rank)  # every rank trains on its own data
    out = []
    for _ in range(STEPS):
        r = _train_step(model, opt, watch, torch.randint(0, VOCAB, (B, L), generator=g))
        if r is not None:
            out.append(
                {
                    "step": r["step"],
                    "reduced": r["layers"]["blocks.0.mixer"]["entropy"]["avg"],
                    "local": sum(r["layers"]["blocks.0.mixer"]["entropy"]["per_index"])
                    / len(r["layers"]["blocks.0.mixer"]["entropy"]["per_index"]),
                    "ranks": r["layers"]["blocks.0.mixer"]["ranks"],
                }
            )
    watch.close()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"results": out, "sink_calls": len(seen)}, f)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_ranks_reduce_and_rank_zero_writes(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mp.spawn(run_rank, args=(_worker, 2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    steps = [x["step"] for x in r0["results"]]
    assert steps == [x["step"] for x in r1["results"]] == [0, 2, 4]
    for a, b in zip(r0["results"], r1["results"]):
        assert a["ranks"] == b["ranks"] == 2
        assert a["local"] != b["local"]  # each rank measured its own batch
        assert a["reduced"] == pytest.approx((a["local"] + b["local"]) / 2, rel=1e-9)
        assert a["reduced"] == b["reduced"]
    assert r0["sink_calls"] == 3 and r1["sink_calls"] == 0  # sinks run on rank 0 only
    files = list((tmp_path / "tb").iterdir())
    assert len(files) == 1  # one writer: rank 0
    ea = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0})
    ea.Reload()
    logged = [(e.step, e.value) for e in ea.Scalars("ess/entropy/avg/blocks.0.mixer")]
    assert [s for s, _ in logged] == [0, 2, 4]
    assert [v for _, v in logged] == pytest.approx([x["reduced"] for x in r0["results"]], rel=1e-6)


def _bg_worker(rank: int, tmp: str) -> None:
    """background=True, reduce=True, a sample due at every step (so ranks race their workers)
    and a budget (its level is agreed on collectively)."""
    import esswatch
    from esswatch.layers import SequenceModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(
        SequenceModel(VOCAB, d_model=16, n_layers=2, mixer="attention", n_heads=2)
    )
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    watch = esswatch.ESSWatch(
        model, logdir=os.path.join(tmp, "tb"), every_n_steps=1, reduce=True, background=True, budget_seconds=0.01
    )
    g = torch.Generator().manual_seed(100 + rank)
    out = []

    def keep(r):
        lay = r["layers"]["blocks.0.mixer"]
        out.append(
            {
                "step": r["step"],
                "reduced": lay["entropy"]["avg"],
                "ranks": lay["ranks"],
                "local": sum(lay["entropy"]["per_index"]) / len(lay["entropy"]["per_index"]),
                "skipped": r["skipped_samples"],
                "budget": r["budget"],
            }
        )

    for s in range(3 * STEPS):
        x = torch.randint(0, VOCAB, (B, L + 4 * rank * (s % 2)), generator=g)  # uneven work per rank
        r = _train_step(model, opt, watch, x)
        if r is not None:
            keep(r)
    watch.close()
    last = watch.latest()
    if last is not None and (not out or out[-1]["step"] != last["step"]):
        keep(last)
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"results": out, "skipped": watch.state_dict()["skipped_samples"]}, f)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_ddp_background_reduce_ranks_agree_without_deadlock(tmp_path):
    mp.spawn(run_rank, args=(_bg_worker, 2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    steps = [x["step"] for x in r0["results"]]
    assert steps and steps[0] == 0
    assert steps == [x["step"] for x in r1["results"]]
    assert r0["skipped"] == r1["skipped"] and len(steps) + r0["skipped"] == 3 * STEPS
    for a, b in zip(r0["results"], r1["results"]):
        assert a["ranks"] == b["ranks"] == 2
        assert a["reduced"] == b["reduced"]
        assert a["reduced"] == pytest.approx((a["local"] + b["local"]) / 2, rel=1e-9)
        assert a["skipped"] == b["skipped"]
        level = ("batch_rows", "heads", "indices", "cut")  # the agreed level (timings are per rank)
        assert [a["budget"][k] for k in level] == [b["budget"][k] for k in level]
    # the level's rule on each rank: cut until the prediction fits, or nothing needed a cut (a
    # fast first sample: the measurement got quicker and 0.01 s no longer forces a cut)
    from esswatch.watch.budget import TARGET

    for r in (r0, r1):
        bud = r["results"][-1]["budget"]
        assert bud["cut"] or bud["predicted_seconds"] <= TARGET * 0.01, bud


PROBE_L = 9


def _probe_fail_worker(rank: int, tmp: str, background: bool) -> None:
    import esswatch
    from esswatch.layers import SequenceModel

    class FlakyProbe(SequenceModel):
        """Its next probe-batch forward raises (a transient error, e.g. out of memory, on one rank)."""

        fail_next_probe = False

        def forward(self, x):
            if self.fail_next_probe and x.shape[-1] == PROBE_L:
                self.fail_next_probe = False
                raise RuntimeError("probe forward failed on this rank")
            return super().forward(x)

    torch.set_num_threads(1)
    torch.manual_seed(0)
    inner = FlakyProbe(VOCAB, d_model=16, n_layers=2, mixer="attention", n_heads=2)
    inner.fail_next_probe = rank == 1
    model = nn.parallel.DistributedDataParallel(inner)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    probe = torch.randint(0, VOCAB, (2, PROBE_L), generator=torch.Generator().manual_seed(7))
    watch = esswatch.ESSWatch(model, every_n_steps=EVERY, reduce=True, background=background, probe_batch=probe)
    g = torch.Generator().manual_seed(100 + rank)
    out = []
    for _ in range(STEPS):
        r = _train_step(model, opt, watch, torch.randint(0, VOCAB, (B, L), generator=g))
        if r is not None:
            out.append({"step": r["step"], "ranks": r["layers"]["blocks.0.mixer"]["ranks"]})
    watch.close()
    last = watch.latest()
    if last is not None and (not out or out[-1]["step"] != last["step"]):
        out.append({"step": last["step"], "ranks": last["layers"]["blocks.0.mixer"]["ranks"]})
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"results": out, "failures": watch.failures}, f)


def _probe_fail_blocking(rank, tmp):
    _probe_fail_worker(rank, tmp, False)


def _probe_fail_background(rank, tmp):
    _probe_fail_worker(rank, tmp, True)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
@pytest.mark.parametrize("body", [_probe_fail_blocking, _probe_fail_background])
def test_ddp_reduce_survives_a_probe_forward_failing_on_one_rank(tmp_path, body):
    """Regression: a probe_batch forward that raised on rank 1 only made that rank skip the sample, so rank
    0 waited in a collective rank 1 never joined (blocking: a hang until gloo's timeout), or the ranks'
    collectives crossed (background: gloo aborted the process). Now the failing rank joins with nothing:
    both ranks log the same steps, the first from rank 0 alone, and rank 1 counts the failure."""
    mp.spawn(run_rank, args=(body, 2, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["results"] == r1["results"] and r0["results"]
    ranks = {x["step"]: x["ranks"] for x in r0["results"]}
    assert ranks.get(0, 1) == 1 and all(n == 2 for s, n in ranks.items() if s > 0)
    assert r1["failures"] >= 1 and r0["failures"] == 0
