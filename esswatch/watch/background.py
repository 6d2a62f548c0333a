"""Measurement off the training path: the job, its measurement and one worker thread.

The pieces (used by :class:`~esswatch.ESSWatch`; the schedule logic lives in
:mod:`esswatch.watch.offload`):

- :func:`snapshot` (:mod:`esswatch.watch.snapshot`, re-exported here) copies a step's records
  off the autograd graph, without synchronizing the training thread.
- :func:`run_job` builds the operators, runs the estimators and summarizes each layer
  (it is also what the blocking mode runs, on the training thread), under
  ``torch.no_grad``; it never touches the global RNG (the estimators use their own
  seeded generator) nor the torch thread count, and turns a layer's failure into an
  entry of ``Outcome.errors`` (the watch warns or raises when it collects the outcome).
- :class:`Worker`: one daemon thread with a single job slot. ``submit`` refuses a job
  while one is running (the watch then skips the sample: nothing queues without bound),
  and ``collect`` returns the outcome.

At interpreter exit with a job still running (a script that never called ``close()``), an
``atexit`` handler cancels it: :func:`run_job` stops before its next layer, and the handler
waits up to :data:`EXIT_WAIT_SECONDS` for the worker thread to end, then warns that the sample
was dropped. Without this wait, CPython (3.11) ends a daemon thread that is inside a torch
call during finalization, which aborts the process ("terminate called without an active
exception"); so does a thread that ends during finalization, whose thread-local torch state
is torn down then. A layer that is still running after the wait (a measurement stuck in user code)
is left to the interpreter's usual end of daemon threads.
"""

from __future__ import annotations

import atexit
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ..operators import Operator
from ..probes import NothingToMeasure
from .failures import ESSWarning
from .measure import MeasureConfig, measurable, measure_operator, select_indices
from .snapshot import TRANSFERS, _Copier, make_copier, snapshot

__all__ = ["Job", "Outcome", "snapshot", "make_copier", "make_job", "run_job", "Worker"]
__all__ += ["TRANSFERS", "EXIT_WAIT_SECONDS"]

#: At interpreter exit, how long to wait for a running job to stop (module doc).
EXIT_WAIT_SECONDS = 30.0


@dataclass
class Job:
    """One sample to measure: per layer either a probe record (``records``) or a ready
    operator (``operators``: the regularizer's stash), plus what the summary needs."""

    step: int
    source: str
    records: Dict[str, Tuple[Any, Dict[str, Any]]]  # name -> (probe, record)
    operators: Dict[str, Operator]
    cfg: MeasureConfig
    tss: Dict[str, Optional[int]]
    penalty: Optional[Dict[str, Any]] = None
    calibrate: bool = False
    ready: Any = None  # CUDA event after the snapshot copies
    stream: Any = None  # the side stream the worker computes on
    cancel: Any = None  # threading.Event: stop before the next layer (set at interpreter exit)


@dataclass
class Outcome:
    step: int
    source: str
    layers: Dict[str, Dict[str, Any]] = field(default_factory=dict)
    errors: List[Tuple[str, BaseException]] = field(default_factory=list)
    seconds: float = 0.0
    penalty: Optional[Dict[str, Any]] = None
    timings: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # calibration (budget)
    fatal: Optional[BaseException] = None
    calibrated: bool = False
    short: List[str] = field(default_factory=list)  # nothing to measure (no index fits, all padding): not a failure


# -- the measurement -----------------------------------------------------------------
def _one_index(cfg: MeasureConfig) -> MeasureConfig:
    import dataclasses

    return dataclasses.replace(cfg, indices=1)


def run_job(job: Job) -> Outcome:
    """Measure every layer of ``job`` (module doc). Never raises for a layer; a failure of
    the whole job (a bug) is returned in ``Outcome.fatal``."""
    out = Outcome(step=job.step, source=job.source, penalty=job.penalty, calibrated=job.calibrate)
    t0 = time.perf_counter()
    try:
        if job.ready is not None:
            job.ready.synchronize()
        ctx = torch.cuda.stream(job.stream) if job.stream is not None else _null()
        with ctx, torch.no_grad():
            names = list(job.records) + [n for n in job.operators if n not in job.records]
            for name in names:
                if job.cancel is not None and job.cancel.is_set():
                    break
                try:
                    if name in job.records:
                        probe, record = job.records[name]
                        try:  # the budget's timing sample keeps rows that are all padding: it times the full level
                            op = probe.realize(record) if job.calibrate else probe.realize_rows(record)
                        except NothingToMeasure:  # every kept row is padding: like L = 1
                            out.short.append(name)
                            continue
                    else:
                        op = job.operators[name]
                        if op is None:  # the penalty found every kept row padding
                            out.short.append(name)
                            continue
                    if op is not None and not measurable(job.cfg.indices, op.seq_len):
                        out.short.append(name)
                        continue
                    if job.calibrate:
                        ta = time.perf_counter()
                        measure_operator(op, _one_index(job.cfg), job.tss.get(name))
                        tb = time.perf_counter()
                    lay = measure_operator(op, job.cfg, job.tss.get(name))
                    if job.calibrate:
                        tc = time.perf_counter()
                        out.timings[name] = {
                            "seq_len": lay["seq_len"],
                            "rows": lay["rows"],
                            "heads": lay["heads"],
                            "indices": list(lay["indices"]),
                            "one": select_indices(1, lay["seq_len"]),
                            "t_one": tb - ta,
                            "t_full": tc - tb,
                            "type": lay["type"],
                        }
                    out.layers[name] = lay
                except Exception as e:  # noqa: BLE001 - the monitor never stops training
                    out.errors.append((name, e))
    except Exception as e:  # noqa: BLE001
        out.fatal = e
    out.seconds = time.perf_counter() - t0
    return out


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- the worker ------------------------------------------------------------------------
def make_job(watch, step: int, source: str, copier: Optional[_Copier] = None) -> Job:
    """The job for ``watch``'s current records (and the regularizer's stash), copied off the
    graph by ``copier`` (``None``: the blocking mode, no copy); the capture is cleared."""
    try:
        probes = watch.capture.probes
        records = {n: p.recorded for n, p in probes.items() if p.has_record}
        cap = watch.capture  # the regularizer's operators hold every head: measure what the records would
        stash = (watch._penalties.stash or {}).items()
        ops = {n: None if op is None else op.narrowed(cap.batch_rows, cap.heads) for n, op in stash}
        ops = {n: op for n, op in ops.items() if n not in records}
        ready = stream = None
        if copier is not None:
            (records, ops), ready, stream = snapshot((records, ops), copier)
            if copier.transfer == "host":
                stream = None
        budget = watch._budget
        return Job(
            step=step,
            source=source,
            records={n: (probes[n], r) for n, r in records.items()},
            operators=ops,
            cfg=watch.measure_config,
            tss=watch._tss,
            penalty=watch._penalties.result(),
            calibrate=budget is not None and not budget.decided,
            ready=ready,
            stream=stream,
        )
    finally:
        watch.capture.clear()


class Worker:
    """One daemon thread running one job at a time (module doc)."""

    def __init__(self, fn: Callable[[Job], Outcome] = run_job, name: str = "esswatch-worker") -> None:
        self._fn = fn
        self._cv = threading.Condition()
        self._job: Optional[Job] = None
        self._outcome: Optional[Outcome] = None
        self._running = False
        self._stop = False
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()
        _LIVE.add(self)

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def _loop(self) -> None:
        while True:
            with self._cv:
                while self._job is None and not self._stop:
                    self._cv.wait()
                if self._stop and self._job is None:
                    return
                job = self._job
            try:
                outcome = self._fn(job)
            except BaseException as e:  # noqa: BLE001 - reported to the training thread
                outcome = Outcome(
                    step=job.step, source=job.source, penalty=job.penalty, fatal=e, calibrated=job.calibrate
                )
            with self._cv:
                self._job = None
                self._outcome = outcome
                self._running = False
                self._cv.notify_all()

    def busy(self) -> bool:
        """A job was submitted and its outcome not yet collected."""
        with self._cv:
            return self._running or self._outcome is not None

    def done(self) -> bool:
        """The submitted job finished (its outcome is waiting to be collected)."""
        with self._cv:
            return self._outcome is not None

    def pending(self) -> bool:
        with self._cv:
            return self._running or self._outcome is not None

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        """Block until no job runs (its outcome, if any, stays to be collected); ``False`` on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: not self._running, timeout)

    def submit(self, job: Job) -> bool:
        """Start ``job``; ``False`` (and nothing happens) while another is not collected."""
        with self._cv:
            if self._stop or self._running or self._outcome is not None:
                return False
            job.cancel = self._cancel
            self._job = job
            self._running = True
            self._cv.notify_all()
            return True

    def collect(self, wait: bool = False) -> Optional[Outcome]:
        """The finished job's outcome (``None`` if none finished; ``wait`` blocks until it has)."""
        with self._cv:
            if wait:
                while self._running:
                    self._cv.wait()
            out, self._outcome = self._outcome, None
            return out

    def shutdown(self) -> None:
        """Let the thread finish its job and exit (does not wait)."""
        with self._cv:
            self._stop = True
            self._cv.notify_all()

    def cancel(self) -> Optional[int]:
        """Stop the running job before its next layer and accept no other; returns the running
        job's step (``None`` if none runs). Does not wait."""
        with self._cv:
            self._stop = True
            self._cancel.set()
            step = self._job.step if self._running and self._job is not None else None
            self._cv.notify_all()
            return step


_LIVE: "weakref.WeakSet[Worker]" = weakref.WeakSet()


def _at_exit() -> None:
    """Interpreter exit (module doc): cancel every worker's job and let every thread end (its
    thread-local torch state is torn down while the interpreter still runs); warn per dropped job."""
    workers = list(_LIVE)
    steps = [w.cancel() for w in workers]
    deadline = time.monotonic() + EXIT_WAIT_SECONDS
    for w, step in zip(workers, steps):
        w.thread.join(max(0.0, deadline - time.monotonic()))
        if step is None:
            continue
        warnings.warn(
            f"esswatch: the interpreter exits with the background sample of step {step} still being measured; "
            + ("it was dropped" if not w.thread.is_alive() else f"it did not stop within {EXIT_WAIT_SECONDS:g} s")
            + " (call watch.close(), or use the watch as a context manager, to wait for it and log it)",
            ESSWarning,
            stacklevel=1,
        )


atexit.register(_at_exit)
