"""The schedule of ``ESSWatch(background=True)``: when samples are handed to the worker,
when results are collected and emitted, and how ranks stay in step.

On a sampled step, ``step()`` snapshots the captured tensors (:func:`~esswatch.watch.
snapshot.snapshot`) and hands them to the worker (:class:`~esswatch.watch.background.
Worker`), then returns. If the worker has not finished (or its result has not been
collected) the sample is *skipped* and counted (``ess/skipped``, cumulative): nothing
queues. A sample captured before a ``budget_seconds`` decision changed what is captured is
skipped the same way. The regularizer's penalty of a skipped step is still logged: a
penalty-only result (:func:`~esswatch.watch.result.penalty_result`), on rank 0, with no
collective. Results are collected and emitted on the training thread, so sinks see one thread,
and in the order of their steps: a penalty-only result is emitted at once when no earlier
sample is outstanding, and otherwise held until that sample's result has been emitted (at most
``MAX_HELD``; past that the held ones go out at once). So every series a logger receives has
increasing steps (Neptune, for one, drops a point older than its series' last one). Each result's
``ess/skipped`` counts the samples skipped before it was emitted (a held one counts them at its
release), so it never decreases along the steps either:

- ``reduce=False``: at every ``step()`` the watch checks (a lock, no wait) whether the
  worker finished, and emits its result with the step it was sampled at;
- ``reduce=True`` (DDP): collection points are deterministic: only sampled steps and
  ``close()``. At a sampled step with a result outstanding, all ranks ``all_reduce`` (MIN)
  a one-element "my worker is done" flag; if every rank is done, every rank collects and
  the usual ``all_reduce`` of the scalars follows, in the same order on every rank; if not,
  every rank skips the new sample and keeps waiting. ``close()`` waits for the own worker,
  then reduces: every rank must call ``close()``. No collective ever runs on the worker.
"""

from __future__ import annotations

import weakref
from typing import Any, Dict, List, Optional

import torch

from . import distributed as dist_utils
from .background import Worker, make_copier, make_job
from .result import penalty_result

__all__ = ["MAX_HELD", "Offload"]

#: penalty-only results held back while an earlier sample is outstanding (module doc)
MAX_HELD = 256


class Offload:
    def __init__(self, transfer: str = "device") -> None:
        self.worker = Worker()
        self.copier = make_copier(transfer)
        self.held: List[tuple] = []  # (step, source, penalty) of skipped samples waiting for an earlier one

    @classmethod
    def started(cls, watch) -> "Offload":
        """The worker of ``watch``, shut down also when the watch is dropped without ``close()``."""
        offload = cls()
        weakref.finalize(watch, offload.worker.shutdown)
        return offload

    def _all_done(self) -> bool:
        done = self.worker.done()
        if dist_utils.world_size() == 1:
            return done
        t = torch.tensor([1.0 if done else 0.0], dtype=torch.float64, device=dist_utils._device())
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return bool(t.item() > 0.5)

    def step(self, watch, step: int) -> Optional[Dict[str, Any]]:
        """``watch.step()``'s work for step ``step`` (before the schedule advances)."""
        result = out = None
        due = watch.schedule.due(step)
        if not watch.reduce:
            out = self.worker.collect()
        elif due and self.worker.pending() and self._all_done():
            out = self.worker.collect(wait=True)
        try:
            if out is not None:
                result = watch._finish(out)
                self._release(watch)  # the penalty-only results held behind it
        finally:  # an earlier sample's error (strict=True) does not cost this step its own sample
            if due:
                self._sample(watch, step)
        return result

    def _sample(self, watch, step: int) -> None:
        source = "probe" if watch.probe_batch is not None else "train"
        stale = watch.probe_batch is None and watch._armed_gen != watch._budget_gen
        if self.worker.pending() or stale:
            watch._skipped_samples += 1
            watch.capture.clear()
            penalty = watch._penalties.result()
            if penalty is not None:  # computed on this thread: logged although nothing is measured
                self.held.append((step, source, penalty))
                if not self.worker.pending() or len(self.held) > MAX_HELD:
                    self._release(watch)  # nothing earlier outstanding (or too many held): now
            return
        if watch.probe_batch is not None and not watch._run_probe(step) and not watch.reduce:
            return  # its forward raised: counted and warned as a failure (under reduce an empty job keeps the ranks
            # in step: every rank has a sample outstanding, so all reach the same collectives; a blocking
            # step() measures nothing on that rank but joins the reduction the same way)
        self.worker.submit(make_job(watch, step, source, self.copier))

    def _release(self, watch) -> None:
        """Emit the held penalty-only results, in the order of their steps."""
        held, self.held = self.held, []
        for step, source, penalty in held:
            result = penalty_result(step, source, watch.measure_config.metrics, penalty, watch._skipped_samples)
            watch._emitter.emit(result, watch.config)

    def before_state(self, watch) -> None:
        """``state_dict()``'s flush: not under ``reduce`` with several ranks (a collective: every rank calls
        :meth:`flush` itself), nor from inside a sink (results would reach the sinks out of step order)."""
        if not (watch.reduce and dist_utils.world_size() > 1) and not watch._emitter.active:
            self.flush(watch)

    def flush(self, watch) -> Optional[Dict[str, Any]]:
        """Wait for the outstanding sample and emit it (all ranks, with ``reduce``), then the
        penalty-only results held behind it."""
        try:
            if self.worker.pending():
                out = self.worker.collect(wait=True)
                if out is not None:
                    return watch._finish(out)
            return None
        finally:
            self._release(watch)

    def close(self, watch, abandon: bool = False) -> Optional[Dict[str, Any]]:
        """:meth:`flush`, then stop the worker; ``abandon``: cancel the outstanding sample instead (nothing is
        reduced or emitted but the penalty-only results held)."""
        try:
            if abandon:
                self.worker.cancel()
                self._release(watch)
                return None
            return self.flush(watch)
        finally:
            self.worker.shutdown()
