"""ESS of a tiny Llama or Mamba trained with the Hugging Face Trainer, in the Trainer's own logs.

    python examples/hf_trainer_mqar.py                          # Llama, CPU, a few minutes
    python examples/hf_trainer_mqar.py --model mamba
    python examples/hf_trainer_mqar.py --regularizer 1e-2       # with the ESS regularizer
    tensorboard --logdir runs/hf_llama

Trains a small randomly initialised ``LlamaForCausalLM`` (or ``MambaForCausalLM``) on
multi-query associative recall, generated in memory (nothing is downloaded). The
callback writes through the Trainer's TensorBoard writer (``ess/...`` scalars next to
``train/loss``, per-head histograms, profile images, the custom-scalars layout, the
configuration) and puts the scalars into ``trainer.state.log_history`` (and
``trainer_state.json``) and the other ``report_to`` integrations, without printing them.
"""

from __future__ import annotations

import argparse

import torch
from esswatch.integrations.transformers import ESSCallback
from transformers import LlamaConfig, LlamaForCausalLM, MambaConfig, MambaForCausalLM, Trainer, TrainingArguments

from esswatch.demo.mqar import mqar_batch


def mqar_dataset(n: int, args, seed: int):
    """MQAR as causal-LM examples: the value of a query is the label of the *next* position,
    because a causal LM's loss shifts labels by one."""
    x, y = mqar_batch(n, args.seq_len, args.num_kv, args.vocab, torch.Generator().manual_seed(seed))
    labels = torch.full_like(y, -100)
    labels[:, 1:] = y[:, :-1]
    return [{"input_ids": x[i], "labels": labels[i]} for i in range(n)]


def make_model(kind: str, vocab: int, d_model: int):
    if kind == "llama":
        return LlamaForCausalLM(
            LlamaConfig(
                hidden_size=d_model,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                intermediate_size=2 * d_model,
                vocab_size=vocab,
                max_position_embeddings=256,
            )
        )
    return MambaForCausalLM(
        MambaConfig(hidden_size=d_model, state_size=16, num_hidden_layers=2, vocab_size=vocab, expand=2, conv_kernel=4)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=("llama", "mamba"), default="llama")
    p.add_argument("--steps", type=int, default=None, help="default 200 (llama), 100 (mamba: slow CPU scan)")
    p.add_argument("--every", type=int, default=25, help="ESS every N optimizer steps")
    p.add_argument("--regularizer", type=float, default=None, help="ESS regularizer weight (default: off)")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--num-kv", type=int, default=8)
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--out", default=None, help="output directory (default runs/hf_<model>)")
    args = p.parse_args()

    args.steps = args.steps or (200 if args.model == "llama" else 100)
    torch.manual_seed(0)
    model = make_model(args.model, args.vocab, args.d_model)
    out = args.out or f"runs/hf_{args.model}"
    targs = TrainingArguments(
        output_dir=out,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch,
        learning_rate=3e-3,
        weight_decay=0.01,
        logging_steps=args.every,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        seed=0,
    )

    ess = ESSCallback(every_n_steps=args.every, regularizer=args.regularizer)
    extra = {"compute_loss_func": ess.compute_loss_func()} if args.regularizer else {}
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=mqar_dataset(args.steps * args.batch, args, seed=1),
        callbacks=[ess],
        **extra,
    )
    trainer.train()

    last = [e for e in trainer.state.log_history if "ess/entropy/avg/model" in e][-1]
    print(f"\nESS at step {last['step']} (TensorBoard files under {out}/runs):")
    for tag, value in last.items():
        if tag == "ess/penalty/total" or tag.startswith("ess/entropy/") and ("/avg/" in tag or "/utilization/" in tag):
            print(f"  {tag:<50} {value:8.3f}")


if __name__ == "__main__":
    main()
