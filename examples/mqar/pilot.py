"""The pilot behind the settings of ``study.py`` (one seed, no ESS measurement): train and print accuracy.

    python examples/mqar/pilot.py '{"mixer": "gla", "d": 32, "kv": 4, "L": 24, "vocab": 32, "steps": 600,
                                    "lr": 1e-2, "n_heads": 2, "d_conv": 3}' [more JSON specs ...]

Each spec: mixer, d (d_model), kv, L, vocab, steps, lr, optional seed (0) and batch (32); every other key
goes to the mixer (n_heads, key_dim, d_conv, d_state, expand, dt_min, dt_max). Held-out accuracy on 256
sequences at 5 points of training. One torch thread. Results are in pilot.md.
"""

import json
import sys

import torch

from esswatch.demo.train import TrainConfig, build_model, train_mqar


def run(mixer, d, kv, L, vocab, steps, lr, seed=0, batch=32, **mk):
    cfg = TrainConfig(
        mixer=mixer,
        d_model=d,
        seq_len=L,
        num_kv=kv,
        vocab_size=vocab,
        batch_size=batch,
        steps=steps,
        lr=lr,
        seed=seed,
        mixer_kwargs=mk,
        eval_every=max(1, steps // 5),
        eval_size=256,
    )
    out = train_mqar(
        build_model(cfg),
        cfg,
        on_step=lambda s, loss, a: a is not None and print("  ", mixer, s, round(a, 3), flush=True),
    )
    print(
        json.dumps(
            dict(
                mixer=mixer,
                d=d,
                kv=kv,
                L=L,
                vocab=vocab,
                steps=steps,
                lr=lr,
                seed=seed,
                batch=batch,
                mk=mk,
                acc=round(out["accuracy"], 3),
                sec=round(out["seconds"], 1),
            )
        ),
        flush=True,
    )


if __name__ == "__main__":
    if not sys.argv[1:] or any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        sys.exit(0)
    torch.set_num_threads(1)
    for spec in sys.argv[1:]:
        run(**json.loads(spec))
