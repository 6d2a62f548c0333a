"""The Gramians of a gated recurrence at the watch's 8 indices: the direct form against the segments between the
indices (``"few"``), and the ``gram`` route's whole call on a Mamba-shaped layer.

    python examples/benchmarks/gram_forms.py --threads 1                      # both sections
    python examples/benchmarks/gram_forms.py --threads 1 --sections forms     # which form is faster where
    python examples/benchmarks/gram_forms.py --threads 1 --sections call      # run it from two commits to compare
    python examples/benchmarks/gram_forms.py --threads 1 --sections watch     # a Hugging Face Mamba layer (same)

``forms``: ``esswatch.engine.gram.gramians(..., method="direct")`` (every index's weighted factors, ``n x L x N``
per matrix) against ``method="few"`` (one batched matmul per segment between the indices), alternating,
without and with a backward pass, over ``L``, the number of matrices and two kinds of gates: GLA-like gates near
1 (``logsigmoid(x + 4)``) and Mamba-like ones (``dt A`` with ``A = -1..-16``, ``dt = softplus(x - 3)``), whose
products underflow within a few hundred steps. The last column is the form ``"auto"`` takes.

``call``: ``entropy_ess(op, 8 indices, estimator="gram")`` on Mamba-like gates per channel (``--channels``
matrices: a Mamba layer's d_inner times its batch rows) at ``--lengths``: the time of the whole call, with its
input validation and its windows check. ``watch``: ``ESSWatch.step()`` (blocking, the default 8 indices and 2
batch rows) on one ``MambaForCausalLM`` layer (hidden 64, d_inner 128, state 16, random init, ``scale.py``'s
Mamba) after a forward pass of 2 x ``--lengths`` tokens: capture and measurement, without the training step.
Figures: median [min-max] of ``--repeats`` after one warm-up call.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import esswatch as ew
from esswatch.engine.gram import gramian_form, gramians
from esswatch.operators import GatedRecurrence

N = 16


def gates(kind, nb, L, g):
    if kind == "gla":
        return torch.nn.functional.logsigmoid(torch.randn(nb, L, N, generator=g) + 4.0)
    dt = torch.nn.functional.softplus(torch.randn(nb, L, 1, generator=g) - 3.0)
    return dt * -torch.arange(1, N + 1, dtype=torch.float32)


def watch_indices(L):
    return sorted({round(j * L / 9) for j in range(1, 9)})


def timed(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return ts


def forms(args):
    print("| gates | L | matrices | n L N matrices | backward | direct, ms | few, ms | direct / few | auto |")
    print("|---|---|---|---|---|---|---|---|---|")
    for grad in (False, True):
        for kind in ("gla", "mamba"):
            for L in args.lengths:
                for nb in (1, 4, 16):
                    g = torch.Generator().manual_seed(0)
                    q, k = (torch.randn(nb, L, N, generator=g).requires_grad_(grad) for _ in range(2))
                    ld = gates(kind, nb, L, g).requires_grad_(grad)
                    idx = torch.tensor(watch_indices(L))

                    def run(method):
                        with torch.set_grad_enabled(grad):
                            P, Q = gramians(q, k, ld, idx, method)
                            if grad:
                                (P.sum() + Q.sum()).backward()

                    ts = {"direct": [], "few": []}
                    ratios = []
                    for _ in range(args.repeats):
                        pair = {m: statistics.median(timed(lambda: run(m), 1)) for m in ts}
                        for m in ts:
                            ts[m].append(pair[m])
                        ratios.append(pair["direct"] / pair["few"])
                    auto = gramian_form(idx.numel(), L, N, nb)[0]
                    d, c = (1e3 * statistics.median(ts[m]) for m in ts)
                    print(
                        f"| {kind} | {L} | {nb} | {idx.numel() * L * N * nb} | {'yes' if grad else 'no'} | {d:.1f} | "
                        f"{c:.1f} | {statistics.median(ratios):.2f}x | {auto} |",
                        flush=True,
                    )


def call(args):
    print("| gates | L | matrices | `gram`, 8 indices, s |")
    print("|---|---|---|---|")
    for L in args.lengths:
        g = torch.Generator().manual_seed(0)
        nb = args.channels
        q, k = torch.randn(nb, L, N, generator=g), torch.randn(nb, L, N, generator=g)
        op = GatedRecurrence(q, k, gates("mamba", nb, L, g))
        ts = timed(lambda: ew.entropy_ess(op, watch_indices(L), estimator="gram"), args.repeats)
        print(f"| mamba | {L} | {nb} | {statistics.median(ts):.3f} [{min(ts):.3f}-{max(ts):.3f}] |", flush=True)


def watch(args):
    import tempfile

    from transformers import MambaConfig, MambaForCausalLM

    print("| model | L | `watch.step()`, blocking, s |")
    print("|---|---|---|")
    for L in args.lengths:
        torch.manual_seed(0)
        cfg = MambaConfig(vocab_size=8000, hidden_size=64, state_size=16, num_hidden_layers=1, expand=2)
        model = MambaForCausalLM(cfg)
        x = torch.randint(0, 8000, (2, L))
        ts = []
        with tempfile.TemporaryDirectory() as logdir, torch.no_grad():
            kw = {"every_n_steps": 1, "histograms": False, "images": False, "background": False}
            with ew.ESSWatch(model, logdir=logdir, **kw) as w:
                for _ in range(args.repeats + 1):  # the first: warm-up
                    model(x)
                    t = time.perf_counter()
                    w.step()
                    ts.append(time.perf_counter() - t)
        ts = ts[1:]
        print(f"| mamba (1 layer, d_inner 128) | {L} | {statistics.median(ts):.3f} [{min(ts):.3f}-{max(ts):.3f}] |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sections", default="forms,call")
    ap.add_argument("--lengths", type=lambda s: [int(x) for x in s.split(",")], default=[256, 1024, 4096])
    ap.add_argument("--channels", type=int, default=256, help="matrices in the call section (d_inner x rows)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    if "forms" in args.sections:
        forms(args)
    if "call" in args.sections:
        call(args)
    if "watch" in args.sections:
        watch(args)


if __name__ == "__main__":
    main()
