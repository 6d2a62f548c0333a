"""Validators for the ``esswatch`` command line: every bad input ends in one line on stderr
saying what is wrong and what is allowed, exit status 2 (argparse's convention), and
nothing is created (everything is checked before any file or folder is written)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Optional

__all__ = [
    "positive_int",
    "non_negative_int",
    "device_arg",
    "check_output_dir",
    "check_output_file",
    "check_demo",
    "check_profile",
    "one_line",
]

_WEIGHTS = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    "tf_model.h5",
    "flax_model.msgpack",
)


def one_line(e: BaseException) -> str:
    """``Type: first line of the message`` (CLI errors stay on one line)."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".rstrip(": ")


def _int_at_least(s: str, low: int) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not an integer (allowed: an integer >= {low})") from None
    if v < low:
        raise argparse.ArgumentTypeError(f"{v} is not allowed (allowed: an integer >= {low})")
    return v


def positive_int(s: str) -> int:
    return _int_at_least(s, 1)


def non_negative_int(s: str) -> int:
    return _int_at_least(s, 0)


def window_int(s: str) -> int:
    """``report --last``: the trend window, at least 2 logged points."""
    return _int_at_least(s, 2)


def device_arg(s: str) -> str:
    """A device this machine has: ``cpu``, ``cuda`` / ``cuda:N`` (when CUDA is available), ``mps``."""
    import torch

    try:
        d = torch.device(s)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{s!r} is not a device (allowed: {_devices()})") from None
    ok = d.type == "cpu" and d.index in (None, 0)
    if d.type == "cuda" and torch.cuda.is_available():
        ok = d.index is None or d.index < torch.cuda.device_count()
    if d.type == "mps":
        ok = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if not ok:
        raise argparse.ArgumentTypeError(f"{s!r} is not available on this machine (allowed: {_devices()})")
    return s


def _devices() -> str:
    import torch

    out = ["cpu"]
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        out += ["cuda"] + [f"cuda:{i}" for i in range(n)]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        out.append("mps")
    return ", ".join(out)


def _writable_ancestor(path: Path) -> Optional[str]:
    """Why a directory cannot be created at ``path`` (``None`` = it can)."""
    p = path
    while True:
        if p.exists():
            if not p.is_dir():
                return f"{p} exists and is not a directory"
            if p != path and not os.access(p, os.W_OK | os.X_OK):
                return f"{p} is not writable"
            if p == path and not os.access(p, os.W_OK | os.X_OK):
                return f"{p} is not writable"
            return None
        if p.parent == p:
            return None
        p = p.parent


def check_output_dir(parser: argparse.ArgumentParser, flag: str, path: Any) -> None:
    why = _writable_ancestor(Path(path).expanduser())
    if why:
        parser.error(f"argument {flag}: cannot write to {path}: {why} (allowed: a writable directory path)")


def check_output_file(parser: argparse.ArgumentParser, flag: str, base: Path) -> None:
    for suffix in (".csv", ".png"):
        f = base.with_suffix(suffix)
        if f.is_dir():
            parser.error(f"argument {flag}: {f} is a directory (allowed: a file path without extension)")
        if f.exists() and not os.access(f, os.W_OK):
            parser.error(f"argument {flag}: {f} is not writable")
    why = _writable_ancestor(base.parent if str(base.parent) else Path("."))
    if why:
        parser.error(f"argument {flag}: cannot write {base}.csv: {why} (allowed: a path in a writable directory)")


def check_demo(parser: argparse.ArgumentParser, args) -> None:
    """Everything ``esswatch demo`` needs, before anything is created."""
    import torch

    from ..layers import SequenceModel

    with torch.device("meta"):
        try:
            SequenceModel(8, d_model=args.width, n_layers=1, mixer=args.mixer)
        except (ValueError, RuntimeError, AssertionError) as e:
            parser.error(
                f"argument --width: {args.width} does not fit mixer {args.mixer!r} ({one_line(e)}); "
                "allowed: a positive multiple of the mixer's head count (e.g. 64)"
            )
    if args.run_name is not None and (
        not args.run_name.strip() or os.sep in args.run_name or args.run_name in (".", "..")
    ):
        parser.error(f"argument --run-name: {args.run_name!r} is not a folder name (allowed: a name without {os.sep})")
    check_output_dir(parser, "--logdir", args.logdir)


def check_profile(parser: argparse.ArgumentParser, args) -> None:
    """The checkpoint directory, the token ids and the output path, before anything is loaded or written."""
    d = Path(args.model)
    if not d.is_dir():
        parser.error(f"argument --model: {args.model} is not a directory (allowed: a save_pretrained directory)")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        parser.error(f"argument --model: {args.model} has no config.json (allowed: a save_pretrained directory)")
    try:
        cfg = json.loads(cfg_path.read_text())
        if not isinstance(cfg, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError, OSError) as e:
        parser.error(
            f"argument --model: {cfg_path} is not a valid config ({one_line(e)}); "
            "allowed: the config.json written by save_pretrained"
        )
    if not isinstance(cfg.get("model_type"), str):
        parser.error(
            f"argument --model: {cfg_path} has no model_type (allowed: the config.json written by save_pretrained)"
        )
    if not any((d / w).is_file() for w in _WEIGHTS):
        parser.error(f"argument --model: no weights in {args.model} (expected one of {', '.join(_WEIGHTS[:2])})")
    vocab = cfg.get("vocab_size")
    if args.tokens is not None and isinstance(vocab, int):
        bad = [t for t in args.tokens if not 0 <= t < vocab]
        if bad:
            parser.error(f"argument --tokens: ids {bad[:5]} are outside the vocabulary (allowed: 0 .. {vocab - 1})")
    if args.tokens is not None and len(args.tokens) < 2:
        parser.error("argument --tokens: give at least 2 token ids")
    base = Path(args.out)
    if base.suffix in (".csv", ".png"):
        base = base.with_suffix("")
    check_output_file(parser, "--out", base)
