"""The MQAR training loop shared by ``esswatch demo`` and ``examples/mqar/study.py``.

:class:`TrainConfig` names the task and the model; :func:`build_model` makes the
:class:`~esswatch.layers.SequenceModel`; :func:`train_mqar` runs AdamW with a linear
warm-up and cosine decay, calls ``watch.step()`` once per optimizer step, and logs the
loss and the held-out query accuracy (tags ``mqar/loss``, ``mqar/accuracy``) to an
optional ``SummaryWriter``. The loss at step ``k`` is that of the forward before step ``k``'s update
(as the ESS, measured on that forward); the accuracy at step ``k`` is evaluated after it (``k + 1``
updates), so the last point is the trained model's. The data come from their own generators, so runs with the
same seed see the same batches whatever is measured.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..layers import MIXERS, SequenceModel
from .mqar import MQAR, accuracy, mqar_batch

__all__ = ["TrainConfig", "build_model", "heldout_batch", "train_mqar", "LOSS_TAG", "ACCURACY_TAG"]

LOSS_TAG = "mqar/loss"
ACCURACY_TAG = "mqar/accuracy"


@dataclass
class TrainConfig:
    """One MQAR training run.

    Args:
        mixer: a name of :data:`esswatch.layers.MIXERS`.
        d_model, n_layers: model size.
        seq_len, num_kv, vocab_size: the task (see :mod:`esswatch.demo.mqar`).
        batch_size, steps, lr, weight_decay, warmup: optimisation (warm-up as a fraction of steps).
        seed: model initialisation and data stream.
        mixer_kwargs: passed to the mixer (e.g. ``{"n_heads": 2}``, ``{"d_state": 8}``).
        eval_every: held-out accuracy every this many steps (0 = only at the end).
        eval_size: held-out sequences.
    """

    mixer: str = "attention"
    d_model: int = 64
    n_layers: int = 2
    seq_len: int = 64
    num_kv: int = 8
    vocab_size: int = 128
    batch_size: int = 32
    steps: int = 1000
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: float = 0.1
    seed: int = 0
    mixer_kwargs: Dict[str, Any] = field(default_factory=dict)
    eval_every: int = 100
    eval_size: int = 256

    def __post_init__(self) -> None:
        if self.mixer not in MIXERS:
            raise ValueError(f"unknown mixer {self.mixer!r}; choose one of {sorted(MIXERS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        MQAR(self.seq_len, self.num_kv, self.vocab_size, 1)  # validates the task

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


def build_model(cfg: TrainConfig, device: torch.device | str = "cpu") -> SequenceModel:
    """The run's model, initialised from ``cfg.seed`` (the global RNG state is restored)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = SequenceModel(
            cfg.vocab_size, d_model=cfg.d_model, n_layers=cfg.n_layers, mixer=cfg.mixer, **cfg.mixer_kwargs
        )
    return model.to(device)


def heldout_batch(cfg: TrainConfig, size: Optional[int] = None):
    """Held-out ``(inputs, labels)`` from a generator the training stream never uses."""
    gen = torch.Generator().manual_seed(10_000 + cfg.seed)
    return mqar_batch(size or cfg.eval_size, cfg.seq_len, cfg.num_kv, cfg.vocab_size, gen)


def _lr_factor(step: int, total: int, warmup: float) -> float:
    w = max(1, int(round(warmup * total)))
    if step < w:
        return (step + 1) / w
    return 0.5 * (1 + math.cos(math.pi * (step - w) / max(1, total - w)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batch, device) -> float:
    """Query accuracy of ``model`` on ``batch`` (eval mode, restored afterwards)."""
    was = model.training
    model.eval()
    try:
        x, y = batch
        return accuracy(model(x.to(device)), y.to(device))
    finally:
        model.train(was)


def train_mqar(
    model: torch.nn.Module,
    cfg: TrainConfig,
    *,
    watch: Any = None,
    writer: Any = None,
    device: torch.device | str = "cpu",
    on_step: Optional[Callable[[int, float, Optional[float]], None]] = None,
) -> Dict[str, Any]:
    """Train ``model`` on MQAR for ``cfg.steps`` steps.

    Args:
        watch: an :class:`esswatch.ESSWatch` (or anything with ``step()``), stepped once per
            optimizer step after ``opt.step()``; with its regularizer on, ``watch.penalty()`` is added
            to the loss that is differentiated (the logged loss is the task loss alone).
        writer: a ``SummaryWriter`` for the loss (every 10 steps) and held-out accuracy.
        on_step: ``on_step(step, loss, accuracy_or_None)`` after every step (progress bars).

    Returns:
        ``{"accuracy", "loss", "seconds", "steps", "history": [(step, accuracy), ...]}``;
        ``loss`` is the mean of the last 10 steps' training losses.
    """
    device = torch.device(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _lr_factor(s, cfg.steps, cfg.warmup))
    data = MQAR(cfg.seq_len, cfg.num_kv, cfg.vocab_size, cfg.batch_size, seed=cfg.seed)
    test = heldout_batch(cfg)
    history = []
    recent = []
    t0 = time.perf_counter()
    acc = None
    for step in range(cfg.steps):
        x, y = data.batch()
        x, y = x.to(device), y.to(device)
        logits = model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        reg = getattr(watch, "regularizer", None) is not None  # ESSWatch(regularizer=w): add its penalty
        (loss + watch.penalty() if reg else loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if watch is not None:
            watch.step()
        lv = float(loss.detach())
        recent = (recent + [lv])[-10:]
        if writer is not None and step % 10 == 0:
            writer.add_scalar(LOSS_TAG, lv, global_step=step)
        acc = None
        last = step == cfg.steps - 1
        if last or (cfg.eval_every and step % cfg.eval_every == 0):
            acc = evaluate(model, test, device)
            history.append((step, acc))
            if writer is not None:
                writer.add_scalar(ACCURACY_TAG, acc, global_step=step)
        if on_step is not None:
            on_step(step, lv, acc)
    return {
        "accuracy": history[-1][1],
        "loss": sum(recent) / len(recent),
        "seconds": time.perf_counter() - t0,
        "steps": cfg.steps,
        "history": history,
    }
