"""The Python API: ``mean`` and friends."""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from .core.engine import Report, execute
from .core.plan import KeyFilter, mean_plan
from .core.reader import Checkpoint
from .errors import PlanError


def webui_metadata(checkpoints: Sequence[Checkpoint], output: str | os.PathLike[str], meta: dict[str, str],
                   weights: Sequence[float] | None) -> dict[str, str]:
    """The keys the webui shows for a merge (as ``merge`` writes them): ``sd_merge_recipe`` and
    ``modelspec.*``; the architecture from the first input."""
    import json
    from pathlib import Path

    from ._core import __version__
    from .errors import AstolfomixError
    from .models.anatomy import detect
    from .models.registry import MODELSPEC

    try:
        arch = detect(checkpoints[0]).arch if checkpoints else "unknown"
    except AstolfomixError:
        arch = "unknown"  # a mean takes any safetensors files, odd ones included
    recipe = {"type": "astolfomix-mean", "inputs": [Path(c.path).name for c in checkpoints],
              "weights": None if weights is None else [float(w) for w in weights],
              "dtype": meta.get("astolfomix.dtype"), "accumulate": meta.get("astolfomix.accumulate"),
              "tool": f"astolfomix_rs {__version__}"}
    return {"sd_merge_recipe": json.dumps(recipe), "modelspec.architecture": MODELSPEC.get(arch, arch),
            "modelspec.title": Path(output).stem}


def mean(
    inputs: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    weights: Sequence[float] | None = None,
    normalize_weights: bool = True,
    dtype: str | None = "f16",
    accumulate: str = "f32",
    threads: int | None = None,
    keys: KeyFilter = None,
    strict: bool = False,
    progress: bool | Callable[[int, int], None] = True,
    overwrite: bool = False,
    durable: bool = True,
    metadata: dict[str, str] | None = None,
    device: str = "cpu",
    **engine_options: Any,
) -> Report:
    """Writes the mean of ``inputs`` (safetensors files) to ``output``.

    Uniform: ``acc = 0f32; acc += f32(x_i)`` in input order, ``acc / N``, rounded to ``dtype``
    ("f16", "bf16", "f32", "f64" or "same"). Weighted: weights normalised in f64 to sum 1
    (unless ``normalize_weights=False``), ``acc += f32(w_i * x_i)``. ``accumulate="f64"`` does the
    same in f64. Bit-identical for any thread count. Keys missing from some inputs are averaged
    over the inputs that have them (listed in ``report.notes["missing"]``; an error with
    ``strict=True``); integer tensors come from the first input.
    """
    checkpoints = [Checkpoint(p) for p in inputs]
    plan = mean_plan(
        checkpoints, weights=weights, normalize_weights=normalize_weights, dtype=dtype,
        accumulate=accumulate, keys=keys, strict=strict,
    )
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:

            raise PlanError(f"metadata keys and values must be strings: {bad[:3]}")
        plan.metadata = {**metadata, **plan.metadata}
    plan.metadata = {**webui_metadata(checkpoints, output, plan.metadata, weights), **plan.metadata}
    return execute(
        plan, output, device=device, threads=threads, progress=progress, overwrite=overwrite,
        durable=durable, **engine_options,
    )
