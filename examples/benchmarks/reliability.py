"""Costs of the reliability fixes (issue 11), measured side by side in one run.

1. Hook overhead on unsampled steps: forward + backward of a small transformer of
   :mod:`esswatch.layers` with no watch, and with ``ESSWatch(model, every_n_steps=10**9)``
   attached after step 0 (every later step unsampled: the hooks are a flag check, now through
   the picklable hook objects plus the model-level forward hook that drops aborted records).
   Blocks alternate (off, watched, off, ...) and the ratio is the median of the paired blocks.
   Run it once with this tree and once with an older tree on ``PYTHONPATH`` to compare.
2. Peak resident memory growth of ``Convolution(h).dense()`` at length ``L`` in a fresh process
   (resident size sampled every 0.5 ms from ``/proc/self/statm`` while the call runs): the
   current construction (a padded kernel, ``unfold`` and a flip) and the former one (an int64
   ``L x L`` lag-index matrix gathered from the kernel), re-implemented here for comparison.

    python examples/benchmarks/reliability.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from torch import nn


def hook_overhead(steps: int, repeats: int) -> None:
    import esswatch
    from esswatch.layers import SequenceModel

    torch.manual_seed(0)
    model = SequenceModel(64, d_model=64, n_layers=2, mixer="attention", n_heads=4)
    x = torch.randint(0, 64, (8, 64))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def block(n):
        t0 = time.perf_counter()
        for _ in range(n):
            logits = model(x)
            nn.functional.cross_entropy(logits.reshape(-1, 64), x.reshape(-1)).backward()
            opt.step()
            opt.zero_grad()
        return (time.perf_counter() - t0) / n

    block(5)
    offs, ons, ratios = [], [], []
    for _ in range(repeats):
        a = block(steps)
        watch = esswatch.ESSWatch(model, every_n_steps=10**9)
        watch.set_step(1)  # step 1 and on: unsampled
        b = block(steps)
        watch.close()
        c = block(steps)
        offs += [a, c]
        ons.append(b)
        ratios.append(b / ((a + c) / 2))
    med = statistics.median(ratios)
    print(f"hook overhead, {steps} steps x {repeats} repeats, {torch.get_num_threads()} thread(s):")
    print(f"  off      median {statistics.median(offs) * 1e3:.2f} ms/step")
    print(f"  watched  median {statistics.median(ons) * 1e3:.2f} ms/step (unsampled steps)")
    print(f"  ratio    median {med:.3f} (min {min(ratios):.3f}, max {max(ratios):.3f})")


_CHILD = r"""
import os, sys, threading, time, torch
L, mode = int(sys.argv[1]), sys.argv[2]
from esswatch.operators import Convolution
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
def old(h):
    r = torch.arange(h.shape[-1])
    lag = r[:, None] - r[None, :]
    return h[..., lag.clamp(min=0)] * (lag >= 0)
h = torch.randn(1, L)
fn = (lambda h: Convolution(h).dense()) if mode == "new" else old
fn(h[..., :8].contiguous())          # warm up at a tiny size
base, peak, done = rss(), [0], [False]
def poll():
    while not done[0]:
        peak[0] = max(peak[0], rss())
        time.sleep(0.0005)
th = threading.Thread(target=poll); th.start()
t = fn(h)
time.sleep(0.01)
done[0] = True; th.join()
peak[0] = max(peak[0], rss())
print(peak[0] - base)
"""


def conv_memory(L: int, repeats: int) -> None:
    print(
        f"Convolution.dense() at L={L}: sampled peak resident growth (fresh process each, median of {repeats}); "
        f"the result alone is {L * L * 4 / 1e6:.0f} MB"
    )
    for mode in ("old", "new"):
        vals = [
            int(
                subprocess.run(
                    [sys.executable, "-c", _CHILD, str(L), mode], check=True, capture_output=True, text=True
                ).stdout
            )
            for _ in range(repeats)
        ]
        print(
            f"  {mode}: median {statistics.median(vals) / 1e6:.0f} MB (min {min(vals) / 1e6:.0f}, "
            f"max {max(vals) / 1e6:.0f})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--L", type=int, default=4096)
    ap.add_argument("--skip-memory", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    hook_overhead(args.steps, args.repeats)
    if not args.skip_memory:
        conv_memory(args.L, 3)


if __name__ == "__main__":
    main()
