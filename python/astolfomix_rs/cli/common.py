"""What every subcommand module shares: the command table, output helpers. Kept apart from
``cli`` so subcommand modules never import the module that imports them."""

from __future__ import annotations

import argparse
import json
import math
from typing import Any, Callable

from ..commands.inspect import human_bytes  # noqa: F401  (shared by the commands)

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


def emit(args: argparse.Namespace, data: Any, text: str) -> None:
    """Prints JSON with --json, else the human text."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    else:
        print(text)


def report_text(r) -> str:
    return (
        f"wrote {r.output} ({r.tensors} tensors, {human_bytes(r.bytes_written)}) in {r.seconds:.2f} s: "
        f"read {human_bytes(r.bytes_read)} at {r.gbps:.2f} GB/s on {r.device} ({r.threads} threads, {r.kernel})"
    )
