"""What every subcommand module shares: the command table, output helpers. Kept apart from
``cli`` so subcommand modules never import the module that imports them."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any, Callable

from ..commands.inspect import human_bytes  # noqa: F401  (shared by the commands)
from ..core.report import escape

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def deco(fn):
        COMMANDS[name] = fn
        return fn

    return deco


def thread_count(text: str) -> int:
    """``--threads``: a whole number from 1 to 1024 (argparse turns the error into an error line)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text[:20]}' is not a whole number") from None
    if not 1 <= n <= 1024:
        raise argparse.ArgumentTypeError(f"must be from 1 to 1024, not {n}")
    return n


def weight_list(text: str) -> list[float]:
    """``--weights``: comma-separated finite numbers."""
    try:
        w = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text[:40]}' is not a comma-separated list of numbers") from None
    if not all(math.isfinite(x) for x in w):
        raise argparse.ArgumentTypeError("weights must be finite numbers")
    return w


def say(*parts: object, file: Any = None, limit: int = 100_000) -> None:
    """Every line a command prints goes through here: file names, tensor names, recipe text and
    metadata come from strangers, so control characters are escaped line by line (a name cannot
    retitle or clear the terminal), each line cut at ``limit`` characters. JSON needs no help:
    ``json.dumps`` escapes them itself."""
    text = " ".join(str(p) for p in parts)
    print("\n".join(escape(line, limit) for line in text.split("\n")), file=file or sys.stdout)


def err_say(*parts: object, limit: int = 100_000) -> None:
    say(*parts, file=sys.stderr, limit=limit)


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Prints JSON with --json, else the human text."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        say(text)


def report_text(r) -> str:
    return (
        f"wrote {r.output} ({r.tensors} tensors, {human_bytes(r.bytes_written)}) in {r.seconds:.2f} s: "
        f"read {human_bytes(r.bytes_read)} at {r.gbps:.2f} GB/s on {r.device} ({r.threads} threads, {r.kernel})"
    )


def add_cache_args(p: argparse.ArgumentParser) -> None:
    """The hash cache options of every command that hashes (see ``commands/hashcache.py``)."""
    p.add_argument("--cache", metavar="FILE", help="hash cache (default: $ASTOLFOMIX_CACHE, else ~/.cache/astolfomix/hashes.json)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the hash cache")
    p.add_argument("--webui-cache", metavar="FILE", help="also read and write the webui's cache.json")
    p.add_argument("--webui-root", metavar="DIR", help="the webui's checkpoint folder (its cache.json names are relative to it)")


def cache_from(args: argparse.Namespace):
    from ..commands.hashcache import HashCache

    return HashCache(args.cache, enabled=not args.no_cache, webui=args.webui_cache, webui_root=args.webui_root)
