"""``esswatch profile``: per-position ESS of a local Hugging Face causal LM on a text.

The analysis the paper uses to compare how language models reset their memory at
delimiters (end-of-sequence tokens, separators): run the checkpoint once on the text
with :func:`esswatch.capture`, compute the entropy-ESS of every layer at every index
``i = 1 .. L-1`` (estimator ``auto``), average over heads / channels, and write

- a CSV, one row per position ``t = 0 .. L-2``: ``position, index, token_id, token,
  delimiter, ess_mean, ess[<layer>]...``. The ESS at position ``t`` is that of
  ``H_{t+1} = T[t+1:, :t+1]``: how much of tokens ``0..t`` the layer carries into the
  outputs after ``t``, i.e. the state right after reading token ``t`` (the last token has
  no future, so no row). ``ess_mean`` is the mean over layers.
- a PNG (when matplotlib is installed): ESS versus position per layer, delimiters marked.

The checkpoint is a directory written by ``save_pretrained`` (nothing is downloaded).
Tokens come from the tokenizer saved in that directory, or are given as ids.
Delimiters: the tokenizer's and the config's end-of-sequence ids, plus any token
strings / ids named on the command line.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch

__all__ = ["load_checkpoint", "layer_profiles", "run_profile"]


def load_checkpoint(path: str, device: str = "cpu"):
    """``(model, tokenizer_or_None)`` from a local ``save_pretrained`` directory (float32, eval mode)."""
    try:
        import transformers  # noqa: F401  (also registers esswatch's Hugging Face probes)
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "esswatch profile needs Hugging Face transformers: pip install 'esswatch[transformers]'"
        ) from e
    if not Path(path, "config.json").is_file():
        raise SystemExit(f"esswatch profile: {path} is not a saved Hugging Face model directory (no config.json)")
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    model.to(device).eval()
    tokenizer = None
    if any(Path(path, f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, tokenizer


def layer_profiles(model: torch.nn.Module, input_ids: torch.Tensor, estimator: str = "auto") -> Dict[str, np.ndarray]:
    """``{layer name: ESS at indices 1..L-1, mean over heads/channels}`` for one sequence ``(1, L)``."""
    from .. import capture, entropy_ess

    L = int(input_ids.shape[-1])
    if L < 2:
        raise SystemExit("esswatch profile: the text must have at least 2 tokens")
    with torch.no_grad(), capture(model, batch_rows=1) as cap:
        model(input_ids=input_ids, use_cache=False)
    out = {}
    for name, op in cap.operators.items():
        e = entropy_ess(op, list(range(1, L)), estimator=estimator)
        out[name] = e.reshape(-1, L - 1).mean(0).double().cpu().numpy()
    if not out:
        raise SystemExit("esswatch profile: no sequence-mixing layer of this model ran")
    return out


def _eos_ids(model, tokenizer) -> set:
    ids = set()
    for src in (getattr(tokenizer, "eos_token_id", None), getattr(model.config, "eos_token_id", None)):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(int(i) for i in src)
    return ids


def delimiter_flags(
    ids: Sequence[int],
    token_strs: Sequence[str],
    display: Sequence[str],
    delimiter_strs: Iterable[str],
    delimiter_ids: Iterable[int],
) -> List[bool]:
    """A token is a delimiter when its id is in ``delimiter_ids`` or its token string or
    decoded text (whitespace stripped) equals one of ``delimiter_strs``."""
    dset = {str(s) for s in delimiter_strs}
    stripped = {s.strip() for s in dset if s.strip()}
    idset = set(int(i) for i in delimiter_ids)
    return [i in idset or t in dset or d.strip() in stripped for i, t, d in zip(ids, token_strs, display)]


def write_csv(path: Path, ids, token_strs, flags, profiles: Dict[str, np.ndarray]) -> None:
    names = list(profiles)
    mean = np.mean(np.stack([profiles[n] for n in names]), axis=0)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["position", "index", "token_id", "token", "delimiter", "ess_mean"] + [f"ess[{n}]" for n in names])
        for t in range(len(ids) - 1):
            w.writerow(
                [t, t + 1, ids[t], token_strs[t], int(flags[t]), f"{mean[t]:.6g}"]
                + [f"{profiles[n][t]:.6g}" for n in names]
            )


def plot_profile(path: Path, display, flags, profiles: Dict[str, np.ndarray], title: str) -> bool:
    """ESS versus position, one line per layer, the mean in black, delimiters as red lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    names = list(profiles)
    L1 = len(next(iter(profiles.values())))
    pos = np.arange(L1)
    fig, ax = plt.subplots(figsize=(min(18, 6 + 0.12 * L1), 4.5))
    cmap = plt.get_cmap("viridis")
    for j, n in enumerate(names):
        ax.plot(
            pos,
            profiles[n],
            color=cmap(j / max(1, len(names) - 1)),
            lw=1,
            alpha=0.8,
            label=n if len(names) <= 8 else None,
        )
    ax.plot(pos, np.mean(np.stack([profiles[n] for n in names]), 0), color="black", lw=2, label="mean over layers")
    for t in range(L1):
        if flags[t]:
            ax.axvline(t, color="red", ls="--", lw=1, alpha=0.7)
    if L1 <= 64:
        ax.set_xticks(pos)
        ax.set_xticklabels([d if len(d) <= 10 else d[:9] + "~" for d in display[:L1]], rotation=90, fontsize=7)
    ax.set_xlabel("position t (ESS of the state after reading token t); red: delimiters")
    ax.set_ylabel("entropy-ESS (mean over heads)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_profile(
    model_path: str,
    text: Optional[str] = None,
    tokens: Optional[Sequence[int]] = None,
    delimiters: Sequence[str] = (),
    delimiter_ids: Sequence[int] = (),
    out: str = "esswatch_profile",
    device: str = "cpu",
    max_length: int = 1024,
    add_special_tokens: bool = True,
    estimator: str = "auto",
    stream=None,
) -> Dict[str, Any]:
    """Profile ``model_path`` on ``text`` (or token ``tokens``); writes ``out.csv`` and ``out.png``.

    Returns ``{"csv", "png" (or None), "layers", "ids", "tokens", "delimiter", "profiles"}``.
    """
    stream = sys.stdout if stream is None else stream
    if (text is None) == (tokens is None):
        raise SystemExit("esswatch profile: give --text or --tokens (one of them)")
    model, tok = load_checkpoint(model_path, device)
    if tokens is not None:
        ids = [int(t) for t in tokens]
    elif tok is None:
        raise SystemExit(f"esswatch profile: no tokenizer in {model_path}; pass token ids with --tokens")
    else:
        ids = list(tok(text, add_special_tokens=add_special_tokens)["input_ids"])
    if len(ids) > max_length:
        print(f"esswatch profile: truncating {len(ids)} tokens to --max-length {max_length}", file=sys.stderr)
        ids = ids[:max_length]
    if tok is not None:
        token_strs = [str(s) for s in tok.convert_ids_to_tokens(ids)]
        display = [tok.decode([i]) for i in ids]
    else:
        token_strs = display = [str(i) for i in ids]
    flags = delimiter_flags(ids, token_strs, display, delimiters, set(delimiter_ids) | _eos_ids(model, tok))
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    profiles = layer_profiles(model, input_ids, estimator)
    out_base = Path(out)
    if out_base.suffix in (".csv", ".png"):
        out_base = out_base.with_suffix("")
    out_base.parent.mkdir(parents=True, exist_ok=True)
    csv_path = out_base.with_suffix(".csv")
    write_csv(csv_path, ids, token_strs, flags, profiles)
    png_path = out_base.with_suffix(".png")
    title = f"{os.path.basename(os.path.normpath(model_path))}: per-position ESS ({len(ids)} tokens)"
    made = plot_profile(png_path, display, flags, profiles, title)
    n_delim = sum(flags[:-1])
    print(f"{len(profiles)} layers, {len(ids)} tokens, {n_delim} delimiter position(s)", file=stream)
    print(f"wrote {csv_path}", file=stream)
    if made:
        print(f"wrote {png_path}", file=stream)
    else:
        print("matplotlib is not installed: CSV only (pip install matplotlib for the plot)", file=stream)
    mean = np.mean(np.stack(list(profiles.values())), 0)
    if n_delim and n_delim < len(ids) - 1:
        f = np.asarray(flags[:-1], bool)
        print(f"mean ESS at delimiters {mean[f].mean():.3f}, elsewhere {mean[~f].mean():.3f}", file=stream)
    return {
        "csv": str(csv_path),
        "png": str(png_path) if made else None,
        "layers": list(profiles),
        "ids": ids,
        "tokens": token_strs,
        "delimiter": flags,
        "profiles": profiles,
    }
