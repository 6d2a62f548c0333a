"""ESSWatch at real model sizes: training step, measurement, and the training thread's share.

Three models (and one more on request), each trained on fixed random batches (L tokens, batch 2):

- ``gpt2``: GPT-2-small-shaped softmax transformer, ``nn.TransformerEncoder`` (d_model 768,
  12 heads, feed-forward 3072, causal mask, ``norm_first``), ``--layers`` deep (GPT-2 small: 12);
- ``llama``: Hugging Face ``LlamaForCausalLM`` from a ``LlamaConfig`` (hidden 768, 12 heads,
  intermediate 2048, vocabulary ``--vocab``), random init, ``--layers`` deep;
- ``mamba``: Hugging Face ``MambaForCausalLM`` from a ``MambaConfig`` (hidden ``--mamba-hidden``,
  state 16, expand 2), random init, ``--layers`` deep;
- ``qwen3_5`` (not in the default ``--models``): Hugging Face ``Qwen3_5ForCausalLM`` with Gated DeltaNet
  layers only (hidden 768, 16 value heads and 8 key heads of dimension 128, as Qwen3-Next's layers per
  head), random init (the gates' default initialisation: most heads forget within a few steps),
  ``--layers`` deep; measured from the Gramians of its delta rule.

Per model, side by side in one run (``--repeats`` samples each, median and min-max):

- ``train``: one training step (forward, backward, AdamW step) without a watch;
- ``measure``: a sampled step's measurement = the time in ``watch.step()`` with
  ``background=False`` (the training thread blocks for all of it);
- ``bg main``: the training thread's time in ``watch.step()`` with ``background=True`` on a
  sampled step (copy off the graph and hand over, plus emitting the previous sample), and
  ``bg worker``: the worker's time for that sample (``result["seconds"]``);
- ``train|busy``: a training step while the worker measures (CPU contention);
- ``ratio``: bg main / measure (must be <= 0.1);
- the slowdown at ``every_n_steps=100``: blocking ``measure / (100 train)``; background
  ``(bg main + k (train|busy - train)) / (100 train)`` with ``k = min(100, bg worker / train|busy)``
  the steps the worker overlaps.

``--budget B`` also runs the ``gpt2`` model with ``budget_seconds=B`` (blocking) and prints the
level chosen after the first sample and the later samples' times against ``1.5 B``.

CPU defaults are small so that a run finishes in minutes on a shared 2-core machine: 1 layer,
vocabulary 8000, Mamba hidden 256, one torch thread. ``--long`` adds L = 4096 (GPU).

    python examples/benchmarks/scale.py --threads 1
    python examples/benchmarks/scale.py --device cuda --layers 12 --long
    python examples/benchmarks/scale.py --device cuda --layers 12 --transfer host   # compare hand-overs
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import esswatch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GPT2Shaped(nn.Module):
    def __init__(self, vocab, layers, d=768, heads=12):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab)

    def forward(self, x):
        L = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(L, device=x.device)
        h = self.encoder(self.embed(x), mask=mask, is_causal=True)
        return self.head(h)


def build(name, args, device):
    torch.manual_seed(0)
    if name == "gpt2":
        model = GPT2Shaped(args.vocab, args.layers)
    elif name == "llama":
        import esswatch.integrations.transformers  # noqa: F401 - registers the HF capture
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=args.layers,
            num_attention_heads=12,
            num_key_value_heads=12,
            max_position_embeddings=max(args.lengths),
        )
        cfg._attn_implementation = "sdpa"
        model = LlamaForCausalLM(cfg)
    elif name == "mamba":
        import esswatch.integrations.transformers  # noqa: F401
        from transformers import MambaConfig, MambaForCausalLM

        cfg = MambaConfig(
            vocab_size=args.vocab,
            hidden_size=args.mamba_hidden,
            state_size=16,
            num_hidden_layers=args.layers,
            expand=2,
            use_mambapy=False,
        )
        model = MambaForCausalLM(cfg)
    elif name == "qwen3_5":
        import esswatch.integrations.transformers  # noqa: F401
        from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

        cfg = Qwen3_5TextConfig(
            vocab_size=args.vocab,
            hidden_size=768,
            intermediate_size=2048,
            num_hidden_layers=args.layers,
            layer_types=["linear_attention"] * args.layers,
            num_attention_heads=12,
            num_key_value_heads=4,
            head_dim=64,
            linear_num_value_heads=16,
            linear_num_key_heads=8,
            linear_key_head_dim=128,
            linear_value_head_dim=128,
            max_position_embeddings=max(args.lengths),
            use_cache=False,  # a cache of linear-attention layers only cannot build the causal mask
        )
        model = Qwen3_5ForCausalLM(cfg)
    else:
        raise ValueError(name)
    return model.to(device)


def logits_of(out):
    return out.logits if hasattr(out, "logits") else out


def make_step(model, args, device, L):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, args.vocab, (args.batch, L), generator=g).to(device)

    def step():
        logits = logits_of(model(x))
        loss = nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(fn, device):
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def med(xs):
    return statistics.median(xs), min(xs), max(xs)


def fmt(xs):
    m, lo, hi = med(xs)
    return f"{m:8.3f} [{lo:.3f}-{hi:.3f}]"


def bench(name, args, device, L):
    model = build(name, args, device)
    model.train()
    step = make_step(model, args, device, L)
    step()  # warm-up
    train = [timed(step, device)[0] for _ in range(args.repeats)]

    kw = dict(every_n_steps=1, histograms=False, images=False, estimator=args.estimator)
    block = []
    with esswatch.ESSWatch(model, background=False, **kw) as w:
        for _ in range(args.repeats + 1):
            step()
            block.append(timed(w.step, device)[0])
        blocking_values = w.latest()
    block = block[1:]  # the first sample includes one-time warm-up

    main, worker, busy = [], [], []
    with esswatch.ESSWatch(model, background=True, **kw) as w:
        w._offload.copier.transfer = args.transfer  # CUDA: side-stream clone or pinned host copy
        for r in range(args.repeats + 2):  # r = 0, 1: warm-up
            step()
            dt, res = timed(w.step, device)  # emits the previous sample, hands this one over
            busy_t = timed(step, device)[0]  # a training step while the worker measures
            w._offload.worker.wait_idle()  # the next sample must not be skipped
            if r >= 2:
                main.append(dt)
                busy.append(busy_t)
                worker.append(res["seconds"])
        step()
        w.step()
    worker = worker or [blocking_values["seconds"]]
    t_train, t_block, t_main = med(train)[0], med(block)[0], med(main)[0]
    t_busy, t_worker = med(busy)[0], med(worker)[0]
    k = min(100.0, t_worker / t_busy)
    slow_block = t_block / (100 * t_train)
    slow_bg = (t_main + k * max(0.0, t_busy - t_train)) / (100 * t_train)
    print(
        f"\n== {name}  L={L}  layers={args.layers}  batch={args.batch}  device={device}  "
        f"threads={torch.get_num_threads()}  (median [min-max] of {args.repeats}, seconds)"
    )
    print(f"  train            {fmt(train)}")
    print(f"  measure (block)  {fmt(block)}")
    print(f"  bg main          {fmt(main)}")
    print(f"  bg worker        {fmt(worker)}")
    print(f"  train|busy       {fmt(busy)}")
    print(
        f"  ratio bg main / measure = {t_main / t_block:.4f}  (per repeat: "
        f"{', '.join(f'{a / b:.4f}' for a, b in zip(main, block))})"
    )
    print(f"  slowdown at every_n_steps=100: blocking {100 * slow_block:.1f}%  background {100 * slow_bg:.2f}%")
    del model
    return {
        "model": name,
        "L": L,
        "train": t_train,
        "measure": t_block,
        "bg_main": t_main,
        "bg_worker": t_worker,
        "busy": t_busy,
        "ratio": t_main / t_block,
    }


def bench_budget(args, device, L, b):
    model = build("gpt2", args, device)
    step = make_step(model, args, device, L)
    secs = []
    with esswatch.ESSWatch(
        model, background=False, every_n_steps=1, histograms=False, images=False, budget_seconds=b
    ) as w:
        for _ in range(args.repeats + 1):
            step()
            r = w.step()
            secs.append(r["seconds"])
        level = w.latest()["budget"]
    later = secs[1:]
    print(
        f"\n== budget_seconds={b:g} on gpt2 L={L}: first sample {secs[0]:.3f} s (timed at full size), "
        f"level {{rows {level['batch_rows']}, indices {level['indices']}, heads {level['heads']}, "
        f"cut {level['cut']}}}, predicted {level['predicted_seconds']:.3f} s"
    )
    print(f"  later samples {fmt(later)}  max/b = {max(later) / b:.2f}  (must be <= 1.5)")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,llama,mamba")
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--mamba-hidden", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--length", type=int, default=1024)
    p.add_argument(
        "--transfer",
        choices=("device", "host"),
        default="device",
        help="CUDA hand-over: clone on a side stream (default) or copy to pinned host memory",
    )
    p.add_argument("--long", action="store_true", help="also L = 4096")
    p.add_argument("--budget", type=float, default=None, help="also run gpt2 with budget_seconds=B")
    p.add_argument("--estimator", default="auto", help="the watch's estimator (randomized: qwen3_5's dense route)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.lengths = [args.length, 4096] if args.long else [args.length]
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device))
    rows = []
    for L in args.lengths:
        for name in filter(None, args.models.split(",")):
            try:
                rows.append(bench(name, args, device, L))
            except torch.cuda.OutOfMemoryError as e:  # "where it fits"
                print(f"\n== {name} L={L}: out of memory ({e})")
                torch.cuda.empty_cache()
    print("\nmodel  L      train   measure  bg-main  bg-worker  ratio")
    for r in rows:
        print(
            f"{r['model']:6s} {r['L']:5d} {r['train']:7.3f} {r['measure']:8.3f} {r['bg_main']:8.4f} "
            f"{r['bg_worker']:9.3f}  {r['ratio']:.4f}"
        )
    if args.budget:
        bench_budget(args, device, args.lengths[0], args.budget)


if __name__ == "__main__":
    main()
