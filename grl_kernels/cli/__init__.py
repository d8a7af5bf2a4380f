"""The ``grl-kernels`` command (also ``python -m grl_kernels``).

Subcommands: ``info`` (versions, devices, backends), ``check`` (every backend against
the reference, plus the published-code fixtures), ``bench`` (attention microbenchmarks)
``bench-model`` (whole GRL models) and ``restore`` (image files). See docs/cli.md
and docs/restore.md.
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import List, Optional

from .commands import cmd_bench, cmd_bench_model, cmd_check, cmd_info

DTYPES = ("float32", "float16", "bfloat16", "float64")


class _Once(argparse.Action):
    """A single-valued option that refuses to be given twice (argparse keeps the last one silently)."""

    def __call__(self, parser, namespace, values, option_string=None):
        seen = namespace.__dict__.setdefault("_given_once", {})
        if self.dest in seen:
            parser.error(f"argument {option_string}: given twice ({seen[self.dest]!r}, then {values!r}); "
                         f"it takes one value per run")
        seen[self.dest] = values
        setattr(namespace, self.dest, values)


def _int_at_least(low: int):
    """argparse type: an int >= low (a count of 0 or less would run something else than asked)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {value}")
        return value

    parse.__name__ = f"int>={low}"
    return parse


_POSITIVE, _NON_NEGATIVE = _int_at_least(1), _int_at_least(0)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="grl-kernels", description="Fused GRL attention kernels: info, check, bench.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("info", help="versions, devices and which backends are available (and why not)")
    s.add_argument("--json", metavar="FILE", help="also write the information as JSON")
    s.set_defaults(func=cmd_info)

    s = sub.add_parser("check", help="check every available backend against the reference path and the fixtures")
    mode = s.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="full", action="store_false", help="small geometries (default)")
    mode.add_argument("--full", dest="full", action="store_true", help="all published and odd geometries, float64 too")
    s.add_argument("--backend", action="append", metavar="NAME", help="check only this backend (repeatable)")
    s.add_argument("--device", action="append", choices=("cpu", "cuda"), help="only this device (repeatable)")
    s.add_argument("--dtype", action="append", choices=DTYPES, help="only this dtype (repeatable)")
    s.add_argument("--case", action="append", metavar="TEXT",
                   help="only cases whose name contains TEXT, e.g. 'window' or 'GRL-B' (repeatable)")
    s.add_argument("--no-backward", action="store_true", help="forward only")
    s.add_argument("--fixtures", metavar="DIR", help="folder of the published-code fixtures (default: $GRL_FIXTURES, ../shared/reference "
                        "next to the repository, or its tests/fixtures)")
    s.add_argument("--no-fixtures", action="store_true", help="skip the fixture checks")
    s.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    s.add_argument("--markdown", metavar="FILE", help="write the table as Markdown")
    s.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    s.set_defaults(func=cmd_check, full=False)

    s = sub.add_parser("bench", help="attention microbenchmarks: time, memory, GFLOP/s, GB/s, speed-ups")
    s.add_argument("--quick", action="store_true", help="two small geometries, few repetitions (~1 min on a CPU)")
    s.add_argument("--geometry", action="append", metavar="SPEC",
                   help="e.g. 'stripe:128x128,size=8xNone,groups=Nonex4,shift=1,f=4,heads=3,dim=30' or "
                        "'window:128x128,ws=8,shift=1,heads=3,dim=30' (repeatable; default: the GRL set)")
    s.add_argument("--size", action=_Once, metavar="HxW", help="image size of the default geometries")
    s.add_argument("--batch", action=_Once, type=_POSITIVE, default=1)
    s.add_argument("--device", action=_Once, choices=("cpu", "cuda"), help="default: cuda when available")
    s.add_argument("--dtype", action=_Once, choices=DTYPES, default="float32")
    s.add_argument("--reps", action=_Once, type=_POSITIVE, help="timed repetitions (default 10, --quick 3)")
    s.add_argument("--warmup", action=_Once, type=_NON_NEGATIVE, default=2)
    s.add_argument("--backend", action="append", metavar="NAME", help="fused backend(s) to time (default: all available)")
    s.add_argument("--baselines", action=_Once, default="reference,compile,flex",
                   help="comma-separated from reference,compile,flex (default: all; 'none' for none)")
    s.add_argument("--no-backward", action="store_true", help="time the forward only")
    s.add_argument("--no-ceilings", action="store_true", help="skip measuring the matmul/copy ceilings")
    s.add_argument("--model", action="store_true", help="run the whole-model benchmark instead (see bench-model)")
    s.add_argument("--preset", action="append", help="with --model: GRL-T, GRL-S, GRL-B (repeatable)")
    s.add_argument("--image-size", type=_POSITIVE, action="append", help="with --model: image side (repeatable)")
    s.add_argument("--no-train", action="store_true", help="with --model: inference only")
    s.add_argument("--json", action=_Once, metavar="FILE")
    s.add_argument("--markdown", action=_Once, metavar="FILE")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("bench-model", help="whole-model benchmark: GRL-T/S/B inference and a training step")
    s.add_argument("--preset", action="append", help="GRL-T, GRL-S, GRL-B or a preset name (repeatable; default all)")
    s.add_argument("--image-size", type=_POSITIVE, action="append", help="image side (repeatable; default 256 and 512)")
    s.add_argument("--task", action=_Once, help="task geometry of grl_kernels.models.TASK_GEOMETRIES (e.g. sr, denoise)")
    s.add_argument("--quick", action="store_true", help="GRL-T on a 32x32 image, 1 repetition (a smoke run)")
    s.add_argument("--batch", action=_Once, type=_POSITIVE, default=1)
    s.add_argument("--device", action=_Once, choices=("cpu", "cuda"))
    s.add_argument("--dtype", action=_Once, choices=DTYPES[:3], default="float32", help="low precision runs under autocast")
    s.add_argument("--reps", action=_Once, type=_POSITIVE, default=3)
    s.add_argument("--backend", action="append", metavar="NAME")
    s.add_argument("--no-train", action="store_true", help="inference only")
    s.add_argument("--no-reference", action="store_true", help="leave out our model with the reference attention")
    s.add_argument("--no-published", action="store_true",
                   help="leave out the published network (spandrel's copy; run by default when installed)")
    s.add_argument("--compile", action="store_true",
                   help="add torch.compile runs: the published network's and each fused backend's (inference)")
    s.add_argument("--optimize", action="store_true",
                   help="add grl_kernels.optimize(model): its dtype choice, compiled with --compile")
    s.add_argument("--json", action=_Once, metavar="FILE")
    s.add_argument("--markdown", action=_Once, metavar="FILE")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_bench_model)

    from ..restore.cli import add_parser as add_restore_parser

    add_restore_parser(sub, _Once)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # recorded in the Markdown reports
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    # SIGTERM (e.g. from `timeout`) becomes KeyboardInterrupt: check and bench then stop early
    # and still print and write what they measured.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if hasattr(signal, "SIGTERM") else None
    try:
        return int(args.func(args) or 0)
    except (ValueError, TypeError, RuntimeError) as exc:
        print(f"grl-kernels {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"grl-kernels {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
