"""Cost of ``esswatch report``'s event-file integrity check next to TensorBoard's own load.

    python examples/benchmarks/report_integrity_check.py [--samples 200]

Writes one ESSWatch run (2-layer attention model, a profile image at every sample, so the
file is image-heavy like a real one), then times, side by side in one process: reading the
run with TensorBoard's EventAccumulator alone (what the report did before), ``read_runs``
(the report's reading: the same load, watching for the loader stopping early), and a full
``check_event_file`` pass (what a damaged file costs on top). Median and spread of 3 runs
each; one thread.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
from esswatch.demo.events import check_event_file, event_files

import esswatch
from esswatch.layers import SequenceModel
from esswatch.tools.report import _load, read_runs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as d:
        torch.manual_seed(0)
        model = SequenceModel(32, d_model=32, n_layers=2, mixer="attention", n_heads=2)
        with esswatch.ESSWatch(model, logdir=d, every_n_steps=1, images=True) as watch:
            for _ in range(args.samples):
                model(torch.randint(0, 32, (2, 64)))
                watch.step()
        (f,) = event_files(d)
        size = os.path.getsize(f)
        t_load, t_read, t_check = [], [], []
        for _ in range(3):
            t0 = time.perf_counter()
            _load(d)
            t_load.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert read_runs(d)[0]["corrupt"] == []
            t_read.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            assert check_event_file(f) is None
            t_check.append(time.perf_counter() - t0)
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"event file: {size / 1e6:.2f} MB, {args.samples} samples (image at every one), 1 thread")
    print(f"EventAccumulator load : median {med(t_load):.3f} s  (min {min(t_load):.3f}, max {max(t_load):.3f})")
    print(f"read_runs (report)    : median {med(t_read):.3f} s  (min {min(t_read):.3f}, max {max(t_read):.3f})")
    print(f"check_event_file      : median {med(t_check):.3f} s  (min {min(t_check):.3f}, max {max(t_check):.3f})")
    print(f"read_runs / load      : {med(t_read) / med(t_load):.2f}   check / load: {med(t_check) / med(t_load):.2f}")


if __name__ == "__main__":
    main()
