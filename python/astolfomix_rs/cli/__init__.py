"""The ``astolfomix`` command. Subcommands only parse arguments, build plans (through the library)
and print; errors print one clear line and exit 2, never a traceback."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from .. import _core
from .._core import __version__
from ..api import mean
from ..errors import AstolfomixError
from ..tools import bench, bench_robust
from . import merge as recipe_cli
from . import models as anatomy_cli
from .common import (  # noqa: F401
    COMMANDS,
    command,
    emit,
    err_say,
    human_bytes,
    report_text,
    say,
    thread_count,
    weight_list,
)


@command("mean")
def cmd_mean(args: argparse.Namespace) -> int:

    weights = args.weights
    r = mean(
        args.inputs, args.output, weights=weights, dtype=args.dtype, accumulate=args.accumulate,
        threads=args.threads, strict=args.strict, progress=not args.json, overwrite=args.overwrite,
        durable=not args.no_fsync, device=args.device,
    )
    missing = r.notes.get("missing") or {}
    text = report_text(r)
    if missing:
        text += f"\n{len(missing)} keys missing from some inputs (averaged over the others):"
        for k, files in list(missing.items())[:10]:
            text += f"\n  {k}: missing from {', '.join(files)}"
    emit(args, r.as_dict(), text)
    return 0


def _bench_method(args: argparse.Namespace, ns: list[int], log) -> int:
    folder = Path(args.folder or "bench-out")
    rows = bench_robust.bench_method(
        args.method, ns, folder=folder, arch=args.arch or "sdxl",
        factor=args.factor, threads=int(args.threads) if args.threads else None,
        sd_mecha_ns=tuple(int(n) for n in args.sd_mecha_n.split(",")) if args.sd_mecha_n else (), log=log,
        precision=args.precision or "f64",
    )
    emit(args, bench_robust.rows_json(rows), bench_robust.table(rows, args.method, args.precision or "f64"))
    log(f"inputs and recipes left in {folder} (remove it to free the space)")
    return 0


@command("bench")
def cmd_bench(args: argparse.Namespace) -> int:
    log = err_say if args.json else say
    ns = [int(n) for n in str(args.n).split(",")]
    if args.method:
        return _bench_method(args, ns, log)
    threads = [int(t) for t in args.threads.split(",")] if args.threads else None
    reps = [
        bench.run(
            n=n, arch=args.arch or "sd1", factor=args.factor, folder=args.folder, files=args.files or None,
            threads=threads, repeat=args.repeat, naive_torch=not args.no_naive, cuda=args.cuda, log=log,
        )
        for n in ns
    ]
    data = reps[0].as_dict() if len(reps) == 1 else [r.as_dict() for r in reps]
    emit(args, data, "\n" + "\n\n".join(r.table() for r in reps))
    if args.plot:
        if bench.plot(reps, args.plot):
            log(f"wrote {args.plot}")
        else:
            log("matplotlib is not installed: no plot written")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="astolfomix", description="Merge dozens of Stable Diffusion checkpoints at disk speed.")

    p.add_argument("--version", action="version", version=f"astolfomix_rs {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    m = sub.add_parser("mean", help="uniform or weighted mean of whole checkpoints")
    m.add_argument("inputs", nargs="+")
    m.add_argument("-o", "--output", required=True)
    m.add_argument("--weights", type=weight_list, help="comma-separated, normalised to sum 1")
    m.add_argument("--dtype", default="f16", help="f16 (default), bf16, f32, f64 or same")
    m.add_argument("--accumulate", default="f32", choices=["f32", "f64"])
    m.add_argument("--threads", type=thread_count)
    m.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    m.add_argument("--strict", action="store_true", help="a key missing from some inputs is an error")
    m.add_argument("--overwrite", action="store_true")
    m.add_argument("--no-fsync", action="store_true", help="skip fsync before the rename")
    m.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="time the engine against the read/write floor and other tools")
    b.add_argument("-n", default="4", help="number of synthetic inputs, or a list like 2,4,6 (default 4)")
    b.add_argument("--arch", choices=["sd1", "sdxl"], help="layout of the synthetic inputs (default sd1; sdxl with --method)")
    b.add_argument("--factor", type=int, default=1, help="shrink large dimensions by this (1 = full size)")
    b.add_argument("--folder", help="where inputs and outputs go (default ./bench-out)")
    b.add_argument("--files", nargs="*", help="your own checkpoints instead of synthetic ones")
    b.add_argument("--threads", help="comma-separated thread counts (default 1 and all)")
    b.add_argument("--repeat", type=int, default=2, help="best of this many runs per contender")
    b.add_argument("--no-naive", action="store_true", help="skip naive torch")
    b.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=None)
    b.add_argument("--plot", help="write a PNG of input GB/s against N per contender (needs matplotlib)")
    b.add_argument("--method", help="a robust merge instead of the mean: " + ", ".join(bench_robust.METHODS)
                   + " (SDXL-layout fine-tunes; use --factor 4 for 0.45 GB files)")
    b.add_argument("--sd-mecha-n", default="8", help="with --method: the N values sd-mecha also runs (default 8)")
    b.add_argument("--precision", choices=["f32", "f64"],
                   help="with --method: working precision of both tools (default f64; sd-mecha's merge_dtype)")
    b.add_argument("--json", action="store_true")

    for name, fn in _extra_parsers():
        fn(sub)
    return p


def _extra_parsers():
    """Subcommands defined beside their features (recipes, anatomy)."""

    return [("recipe", recipe_cli.add_parsers), ("anatomy", anatomy_cli.add_parsers)]


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM (kill, a job scheduler) and SIGHUP (the terminal closed) stop a run the way Ctrl-C
    # does: the engine sees the interrupt within a second and removes its temp file.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    cores = os.cpu_count() or 1
    if isinstance(getattr(args, "threads", None), int) and args.threads > cores:
        err_say(f"note: --threads {args.threads} capped to {cores}, the threads this machine has")
        args.threads = cores
    done_before = len(_core.committed())
    try:
        return COMMANDS[args.command](args)
    except AstolfomixError as e:
        # Messages quote files, tensor names and recipe text: err_say escapes each of their lines.
        err_say(f"astolfomix {args.command}: error: {e}", limit=4000)
        return 2
    except KeyboardInterrupt:
        # The interrupt can land after the rename (Python sees it once the engine returns): say
        # what is really on disk.
        wrote = _core.committed()[done_before:]
        if wrote:
            err_say(f"astolfomix {args.command}: interrupted after writing {', '.join(map(str, wrote))} "
                    "(complete and in place)")
        else:
            err_say(f"astolfomix {args.command}: interrupted; no output was written")
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        # A file the command itself opens (a folder it creates, a recipe it reads).
        where = f"{e.filename}: " if e.filename else ""
        err_say(f"astolfomix {args.command}: error: {where}{e.strerror or e}")
        return 2
    except Exception as e:  # a bug: one line, not a traceback (ASTOLFOMIX_DEBUG=1 shows it)
        if os.environ.get("ASTOLFOMIX_DEBUG"):
            raise
        err_say(f"astolfomix {args.command}: internal error: {type(e).__name__}: {e} "
                "(please report it; ASTOLFOMIX_DEBUG=1 shows the traceback)")
        return 3


