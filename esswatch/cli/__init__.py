"""The ``esswatch`` command: ``demo``, ``report``, ``profile`` (a thin argparse front end;
the work lives in :mod:`esswatch.demo`)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .._version import __version__
from .args import check_demo, check_profile, device_arg, non_negative_int, one_line, positive_int, window_int

__all__ = ["main", "build_parser"]


def _demo(args) -> int:
    import torch

    from ..demo.run import run_demo

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    elif (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cpu"):
        torch.set_num_threads(1)  # a 100k-parameter model: one thread is fastest and never oversubscribes
    try:
        run_demo(
            steps=args.steps,
            mixer=args.mixer,
            d_model=args.width,
            device=args.device,
            logdir=args.logdir,
            every_n_steps=args.every,
            seed=args.seed,
            run_name=args.run_name,
            progress=not args.quiet,
        )
    except OSError as e:  # the log folder could not be created or written after all
        print(f"esswatch demo: error: cannot write the run under {args.logdir}: {one_line(e)}", file=sys.stderr)
        return 2
    return 0


def _report(args) -> int:
    from ..tools.report import report, validate_window

    try:
        validate_window(args.last)
        return report(args.logdir, k=args.last, as_json=args.json)
    except (FileNotFoundError, ValueError) as e:
        print(f"esswatch report: {e}", file=sys.stderr)
        return 2


def _profile(args) -> int:
    from ..tools.profile import run_profile

    try:
        return _run_profile(args, run_profile)
    except SystemExit as e:
        if isinstance(e.code, str):  # a bad input found once the model was loaded: one line, status 2 as for the rest
            print(e.code, file=sys.stderr)
            return 2
        raise
    except Exception as e:  # noqa: BLE001 - a checkpoint that passed the checks but does not load or run
        print(f"esswatch profile: error: cannot profile {args.model}: {one_line(e)}", file=sys.stderr)
        return 2


def _run_profile(args, run_profile) -> int:
    run_profile(
        args.model,
        text=args.text,
        tokens=args.tokens,
        delimiters=args.delimiter,
        delimiter_ids=args.delimiter_id,
        out=args.out,
        device=args.device,
        max_length=args.max_length,
        add_special_tokens=args.special_tokens,
        estimator=args.estimator,
    )
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error: ``esswatch demo: error: <what is wrong> (allowed: ...)``, exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser() -> argparse.ArgumentParser:
    from ..demo.run import DEMO_DEFAULTS
    from ..layers import MIXERS

    p = _Parser(prog="esswatch", description="Effective state-size (ESS) of sequence models.")
    p.add_argument("--version", action="version", version=f"esswatch {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,report,profile}")

    d = sub.add_parser(
        "demo",
        help="train a small model on MQAR with ESSWatch and log to TensorBoard",
        description="Train a small model on multi-query associative recall with ESSWatch attached "
        "(under 3 minutes on one CPU core), then print the TensorBoard command.",
    )
    d.add_argument(
        "--steps", type=positive_int, default=DEMO_DEFAULTS["steps"], help="optimizer steps (default %(default)s)"
    )
    d.add_argument("--mixer", default=DEMO_DEFAULTS["mixer"], choices=sorted(MIXERS), help="default %(default)s")
    d.add_argument("--width", type=positive_int, default=DEMO_DEFAULTS["d_model"], help="d_model (default %(default)s)")
    d.add_argument("--device", type=device_arg, default=None, help="cpu, cuda, ... (default: cuda when available)")
    d.add_argument("--logdir", default="runs/demo", help="TensorBoard directory (default %(default)s)")
    d.add_argument("--run-name", default=None, help="subdirectory of --logdir (default <mixer>-<time>)")
    d.add_argument("--every", type=positive_int, default=None, help="measure ESS every N steps (default steps/40)")
    d.add_argument("--seed", type=non_negative_int, default=0)
    d.add_argument("--threads", type=positive_int, default=None, help="CPU threads (default 1 on CPU)")
    d.add_argument("--quiet", action="store_true", help="no progress line")
    d.set_defaults(func=_demo)

    r = sub.add_parser(
        "report",
        help="per-layer table of the latest ESS from TensorBoard event files",
        description="Print, from the event files alone, the latest ESS, utilization and trend of "
        "every layer of every run under LOGDIR.",
    )
    r.add_argument("logdir")
    r.add_argument(
        "--last",
        type=window_int,
        default=5,
        help="trend window in logged points, an integer >= 2 (default %(default)s)",
    )
    r.add_argument(
        "--json",
        action="store_true",
        help="machine-readable output (strict JSON: NaN and infinities are written as null)",
    )
    r.set_defaults(func=_report)

    f = sub.add_parser(
        "profile",
        help="per-position ESS of a local Hugging Face checkpoint on a text",
        description="Per-position ESS of every layer of a local Hugging Face causal LM "
        "(a save_pretrained directory) on a text, with delimiters marked; writes "
        "OUT.csv and OUT.png.",
    )
    f.add_argument("--model", required=True, help="save_pretrained directory (nothing is downloaded)")
    src = f.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="text to tokenize with the directory's tokenizer")
    src.add_argument("--tokens", type=int, nargs="+", help="token ids (when there is no tokenizer)")
    f.add_argument(
        "--delimiter",
        action="append",
        default=[],
        metavar="TOKEN",
        help="token string to mark (repeatable); the end-of-sequence token is always marked",
    )
    f.add_argument(
        "--delimiter-id", action="append", type=int, default=[], metavar="ID", help="token id to mark (repeatable)"
    )
    f.add_argument("--out", default="esswatch_profile", help="output path without extension (default %(default)s)")
    f.add_argument("--device", type=device_arg, default="cpu")
    f.add_argument("--max-length", type=positive_int, default=1024)
    f.add_argument("--estimator", default="auto", choices=["auto", "exact", "randomized"])
    f.add_argument(
        "--special-tokens",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let the tokenizer add its special tokens (BOS) (default: yes)",
    )
    f.set_defaults(func=_profile)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sub = parser._subparsers._group_actions[0].choices.get(args.command, parser)
    if args.command == "demo":
        check_demo(sub, args)  # everything is checked before anything is created
    elif args.command == "profile":
        check_profile(sub, args)
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away (`esswatch report ... | head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
