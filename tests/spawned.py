"""Spawned gloo ranks for the DDP tests: one process group per rank, torn down cleanly."""

from __future__ import annotations

import datetime
import gc
import os

import torch.distributed as dist


def run_rank(rank: int, body, world: int, tmp: str) -> None:
    """``body(rank, tmp)`` in a gloo process group of ``world`` ranks, then the group's teardown.

    The rendezvous is a file in ``tmp`` (no TCP port to race for with other tests). The body's
    objects are collected before ``destroy_process_group`` while the interpreter is fully alive:
    ``DistributedDataParallel`` holds reference cycles, so without ``gc.collect()`` the module (and
    its reference to the group) outlives the body and is freed during the interpreter's
    finalization. A spawned rank aborted at exit there once in CI ("terminate called without an
    active exception", SIGABRT, after its work was done); torch describes that failure for gloo
    work freed during finalization (pytorch/pytorch#179291).
    """
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(tmp, 'rendezvous')}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),  # a collective mismatch fails the test instead of hanging it
    )
    try:
        body(rank, tmp)
    finally:
        gc.collect()
        dist.destroy_process_group()
