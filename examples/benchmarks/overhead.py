"""Training-throughput overhead of ESSWatch, measured in one process.

Two small models of :mod:`esswatch.layers` (a softmax transformer and a gated-linear-attention
recurrent model) train on fixed random batches in three configurations, interleaved block by
block (the order rotates every repeat) so that machine noise hits all of them alike:

- ``off``: no watch;
- ``default``: ``ESSWatch(model, writer=..., every_n_steps=100)`` with every other setting at its
  default (TensorBoard scalars, histograms and profile images included);
- ``every step``: the same with ``every_n_steps=1`` (the worst case);
- ``off (control)``: ``off`` again; its "slowdown" is the noise floor of the machine.

Printed per model and configuration: the median step time, the slowdown against ``off`` (the
median over repeats of the paired block ratios) in wall time and in process CPU time (steadier
on a shared machine; the control row shows how much noise remains), the share of the wall time
spent inside ``watch.step()`` (measurement and
logging; the rest of the watch's cost is its hooks, a flag check on unsampled steps), and memory
measured in a separate pass: peak of Python allocations (tracemalloc), peak growth of resident
memory (on CUDA: ``torch.cuda.max_memory_allocated`` growth). Last, the default-settings overhead
derived from the per-sample cost (every-step slowdown / 100), which noise affects far less.

On a CPU shared with other processes, pass ``--threads 1``: oversubscribed OpenMP threads slow
LAPACK calls (the SVDs) by an order of magnitude and drown the measurement.

    python examples/benchmarks/overhead.py                  # CPU
    python examples/benchmarks/overhead.py --device cuda    # GPU figures
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
import tracemalloc

import torch
from torch import nn
from torch.utils.tensorboard import SummaryWriter

import esswatch
from esswatch.layers import SequenceModel

VOCAB = 256
MODELS = {
    # name: (mixer, mixer kwargs, d_model, n_layers, seq_len, batch)
    "transformer": ("attention", {"n_heads": 4}, 128, 4, 128, 8),
    "recurrent (GLA)": ("gla", {"n_heads": 4}, 64, 4, 64, 8),
}
CONFIGS = ("off", "default", "every step", "off (control)")


def build(name: str, device: str):
    mixer, kw, d, n_layers, seq_len, batch = MODELS[name]
    torch.manual_seed(0)
    model = SequenceModel(VOCAB, d_model=d, n_layers=n_layers, mixer=mixer, **kw).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    data = [torch.randint(0, VOCAB, (batch, seq_len), generator=g).to(device) for _ in range(8)]
    return model, opt, data


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_steps(model, opt, data, n: int, watch, device: str):
    """Wall time, process CPU time of ``n`` steps and the wall time spent inside ``watch.step()``."""
    in_watch = 0.0
    sync(device)
    t0, c0 = time.perf_counter(), time.process_time()
    for s in range(n):
        x = data[s % len(data)]
        logits = model(x)
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if watch is not None:
            t = time.perf_counter()
            watch.step()
            in_watch += time.perf_counter() - t
    if watch is not None:
        t = time.perf_counter()
        watch.close()  # flushes the writer
        in_watch += time.perf_counter() - t
    sync(device)
    return time.perf_counter() - t0, time.process_time() - c0, in_watch


def make_watch(config: str, model, writer, start: int = 0):
    """The watch of a configuration, its step counter continued from ``start`` (as in one long run)."""
    if config.startswith("off"):
        return None
    watch = esswatch.ESSWatch(model, writer=writer, every_n_steps=100 if config == "default" else 1)
    watch.set_step(start)
    return watch


class RSSPeak:
    """Peak resident-set growth over a region, polled every millisecond (Linux)."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self):
        self.base = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def growth_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def memory_pass(name: str, config: str, steps: int, device: str, writer):
    model, opt, data = build(name, device)
    train_steps(model, opt, data, 3, None, device)  # allocator warm-up
    watch = make_watch(config, model, writer)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    tracemalloc.start()
    with RSSPeak() as rss:
        train_steps(model, opt, data, steps, watch, device)
    py_peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    cuda = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else None
    return py_peak, rss.growth_mib, cuda


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100, help="steps per block (a multiple of 100)")
    ap.add_argument("--worst-steps", type=int, default=10, help="steps per block of the every-step config")
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    print(
        f"torch {torch.__version__}, device {dev}"
        + (
            f" ({torch.cuda.get_device_name()})"
            if dev == "cuda"
            else f", {torch.get_num_threads()} threads, {os.cpu_count()} CPUs"
        )
    )
    head = (
        "| model | config | step (ms) | slowdown (wall) | slowdown (CPU time) | time in watch.step() "
        "| peak Python alloc (MiB) | peak RSS growth (MiB) |"
        + (" peak CUDA alloc growth (MiB) |" if dev == "cuda" else "")
    )
    print(head)
    print("|" + "---|" * (head.count("|") - 1), flush=True)
    fmt = lambda v, f: "" if v is None else format(v, f)

    def show(row):
        name, config, ms, slow, slow_cpu, sh, py, rss, cuda = row
        line = (
            f"| {name} | {config} | {ms:.1f} | {slow:+.2f}% | {slow_cpu:+.2f}% | {sh:.2f}% | {fmt(py, '.2f')} "
            f"| {fmt(rss, '.1f')} |"
        )
        if dev == "cuda":
            line += f" {fmt(cuda, '.1f')} |"
        print(line, flush=True)

    rows, estimates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        writer = SummaryWriter(tmp)
        for name in args.models:
            model, opt, data = build(name, dev)
            for config in CONFIGS:  # warm-up (imports, writer, caches)
                train_steps(model, opt, data, 3, make_watch(config, model, writer), dev)
            per_step = {c: [] for c in CONFIGS}
            share = {c: [] for c in CONFIGS}
            ratios = {c: [] for c in CONFIGS}
            cpu_ratios = {c: [] for c in CONFIGS}
            done = {c: 0 for c in CONFIGS}  # steps so far per configuration
            for rep in range(args.repeats):
                k = rep % len(CONFIGS)
                order = CONFIGS[k:] + CONFIGS[:k]
                block, cpu = {}, {}
                for config in order:
                    n = args.worst_steps if config == "every step" else args.steps
                    watch = make_watch(config, model, writer, start=done[config])
                    wall, cpu_s, in_watch = train_steps(model, opt, data, n, watch, dev)
                    done[config] += n
                    block[config], cpu[config] = wall / n, cpu_s / n
                    per_step[config].append(wall / n)
                    share[config].append(in_watch / wall)
                for config in CONFIGS:
                    ratios[config].append(block[config] / block["off"])
                    cpu_ratios[config].append(cpu[config] / cpu["off"])
            for config in CONFIGS[:3]:
                n = args.worst_steps if config == "every step" else args.steps
                mem = memory_pass(name, config, min(n, 20), dev, writer)  # step 0 is sampled
                rows.append(
                    (
                        name,
                        config,
                        statistics.median(per_step[config]) * 1e3,
                        (statistics.median(ratios[config]) - 1) * 100,
                        (statistics.median(cpu_ratios[config]) - 1) * 100,
                        statistics.median(share[config]) * 100,
                        *mem,
                    )
                )
            rows.append(
                (
                    name,
                    CONFIGS[3],
                    statistics.median(per_step[CONFIGS[3]]) * 1e3,
                    (statistics.median(ratios[CONFIGS[3]]) - 1) * 100,
                    (statistics.median(cpu_ratios[CONFIGS[3]]) - 1) * 100,
                    0.0,
                    None,
                    None,
                    None,
                )
            )
            for row in rows[-4:]:
                show(row)
            estimates.append((name, rows[-2][3] / 100, rows[-2][4] / 100))
        writer.close()
    print(
        "\nDefault-settings overhead from the per-sample cost (the every-step slowdown / 100, since"
        " unsampled steps only pay a flag check; steadier than the direct ratio when the control is noisy):"
    )
    for name, wall, cpu in estimates:
        print(f"  {name}: {wall:+.2f}% wall, {cpu:+.2f}% CPU time")


if __name__ == "__main__":
    main()
