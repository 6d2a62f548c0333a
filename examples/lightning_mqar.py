"""ESS of a gated-linear-attention model trained with PyTorch Lightning, live in TensorBoard.

    python examples/lightning_mqar.py                       # CPU, a few minutes
    python examples/lightning_mqar.py --regularizer 1e-2    # with the ESS regularizer
    tensorboard --logdir runs/lightning_mqar

Trains :class:`esswatch.layers.SequenceModel` (gated linear attention) on multi-query
associative recall. The only esswatch line is the callback in the Trainer; the
LightningModule does not know about esswatch (its ``training_step`` is untouched, even
with the regularizer). The ESS scalars, per-head histograms and profile images land in
the TensorBoardLogger's run next to the loss and the validation accuracy.
"""

from __future__ import annotations

import argparse

import lightning as L
import torch
import torch.nn.functional as F
from esswatch.integrations.lightning import ESSCallback
from lightning.pytorch.loggers import TensorBoardLogger

from esswatch.demo.mqar import accuracy, mqar_batch
from esswatch.layers import SequenceModel


class MQARModule(L.LightningModule):
    def __init__(self, vocab: int, d_model: int, layers: int, heads: int, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = SequenceModel(vocab, d_model=d_model, n_layers=layers, mixer="gla", n_heads=heads)

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/accuracy", accuracy(self.model(x), y), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)


def mqar_set(n_batches: int, args, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [mqar_batch(args.batch, args.seq_len, args.num_kv, args.vocab, g) for _ in range(n_batches)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=25, help="ESS every N optimizer steps")
    p.add_argument("--regularizer", type=float, default=None, help="ESS regularizer weight (default: off)")
    p.add_argument("--precision", default="32-true", help='e.g. "bf16-mixed"')
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--num-kv", type=int, default=8)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--logdir", default="runs")
    args = p.parse_args()

    L.seed_everything(0)
    train = mqar_set(args.steps, args, seed=1)
    val = mqar_set(4, args, seed=2)
    loader = torch.utils.data.DataLoader(train, batch_size=None, shuffle=True)
    val_loader = torch.utils.data.DataLoader(val, batch_size=None)

    results = []
    ess = ESSCallback(every_n_steps=args.every, regularizer=args.regularizer, sinks=[results.append])
    trainer = L.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        precision=args.precision,
        logger=TensorBoardLogger(args.logdir, name="lightning_mqar"),
        callbacks=[ess],
        val_check_interval=min(100, args.steps),
        log_every_n_steps=10,
        enable_checkpointing=False,
    )
    trainer.fit(MQARModule(args.vocab, args.d_model, args.layers, args.heads, args.lr), loader, val_loader)

    last = results[-1]
    print(f"\nESS at step {last['step']} (logged to {trainer.logger.log_dir}):")
    for name, lay in last["layers"].items():
        e = lay["entropy"]
        print(f"  {name:<20} avg ESS {e['avg']:6.2f}   utilization {e['utilization']:.2f}   (TSS {lay['state_size']})")
    if "penalty" in last:
        print(f"  regularizer penalty: {last['penalty']['total']:.4g}")
    print(f"  validation accuracy: {float(trainer.callback_metrics['val/accuracy']):.3f}")


if __name__ == "__main__":
    main()
