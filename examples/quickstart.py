"""Print the effective state-size of every mixer of two small models.

    python examples/quickstart.py

Builds a tiny softmax-attention model and a tiny gated-linear-attention model,
runs one batch through each under ``esswatch.capture``, and prints per layer the
average entropy-ESS over heads and batch rows, the theoretical state size and the
utilization ESS / TSS_i at a few sequence indices (docs/ess.md, sections 2 and 3).
"""

from __future__ import annotations

import torch

import esswatch as ew
from esswatch.layers import SequenceModel


def report(model: torch.nn.Module, tokens: torch.Tensor, title: str) -> None:
    with torch.no_grad(), ew.capture(model) as cap:
        model(tokens)
    L = tokens.shape[1]
    indices = torch.tensor([L // 8, L // 4, L // 2, 3 * L // 4])
    print(f"\n{title}: entropy-ESS (mean over batch rows and heads) at indices {indices.tolist()}")
    print(
        f"{'layer':<20} {'operator':<18} {'TSS':>6} "
        + " ".join(f"{'i=' + str(i):>9}" for i in indices.tolist())
        + "   utilization"
    )
    for name, op in cap.operators.items():
        ess = ew.entropy_ess(op, indices)  # (batch, head, len(indices))
        avg = ess.mean(dim=tuple(range(ess.dim() - 1)))
        util = (avg / op.tss(indices).to(avg)).mean()
        tss = "grows" if cap.tss[name] is None else str(cap.tss[name])
        print(
            f"{name:<20} {type(op).__name__:<18} {tss:>6} "
            + " ".join(f"{v:9.2f}" for v in avg.tolist())
            + f"   {util:.2f}"
        )


def main() -> None:
    torch.manual_seed(0)
    vocab, L = 64, 128
    tokens = torch.randint(0, vocab, (4, L))
    report(
        SequenceModel(vocab, d_model=64, n_layers=2, mixer="attention", n_heads=4),
        tokens,
        "softmax attention (random init)",
    )
    report(
        SequenceModel(vocab, d_model=64, n_layers=2, mixer="gla", n_heads=4),
        tokens,
        "gated linear attention (random init)",
    )


if __name__ == "__main__":
    main()
