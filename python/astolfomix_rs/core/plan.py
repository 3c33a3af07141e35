"""Plans: the one description of work. Merges, exports, imports, dtype conversions and saved
files all build a :class:`Plan` of ops (copy, cast, mean, constant). :meth:`Plan.resolve` checks it
once, in Rust, against the opened inputs; the Rust engine (CPU) and the torch path (CUDA) both
execute that resolved plan and read through its handles, so no input is opened twice."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from .. import _core
from ..errors import MismatchError, PlanError
from .reader import FLOAT_DTYPES, Checkpoint

DTYPE_ALIASES = {
    "f16": "F16", "fp16": "F16", "float16": "F16", "half": "F16",
    "bf16": "BF16", "bfloat16": "BF16",
    "f32": "F32", "fp32": "F32", "float32": "F32", "float": "F32",
    "f64": "F64", "fp64": "F64", "float64": "F64",
    "f8_e4m3": "F8_E4M3", "fp8": "F8_E4M3", "f8_e5m2": "F8_E5M2",
    "same": None, "keep": None,
}


def parse_dtype(dtype: str | None) -> str | None:
    """Normalises a user dtype ("f16", "bf16", "same", ...) to the header spelling or None (= same as source)."""
    if dtype is None:
        return None
    key = dtype.lower()
    if key in DTYPE_ALIASES:
        return DTYPE_ALIASES[key]
    if dtype.upper() in FLOAT_DTYPES:
        return dtype.upper()
    raise PlanError(f"unknown output dtype '{dtype}' (use f16, bf16, f32, f64 or same)")


@dataclass
class Output:
    """One output tensor: a ``copy`` of one source (converted if ``dtype`` differs), a ``cast``, a
    ``mean`` of several in this order, a ``constant`` (``data``: its bytes, ``shape``), or an
    ``expr``: linear terms and robust merges over the sources, in the plan's ``precision`` (see
    ``rust/robust.rs``)."""

    name: str
    op: str  # "copy" | "cast" | "mean" | "constant"
    sources: list[tuple[int, str]]  # (input index, tensor name)
    dtype: str | None = None  # None: same as the first source; a constant's stored dtype
    weights: list[float] | None = None  # normalised; None = uniform (divide by N)
    data: np.ndarray | None = None  # a constant's bytes (uint8, C-contiguous)
    shape: tuple[int, ...] | None = None  # a constant's shape
    #: an ``expr``'s terms: ``(linear, [(coefficient, method, params, points)])`` over ``sources``
    expr: tuple | None = None

    @classmethod
    def constant(cls, name: str, dtype: str, shape: tuple[int, ...], raw: np.ndarray) -> Output:
        data = np.ascontiguousarray(raw).view(np.uint8).reshape(-1)
        return cls(name, "constant", [], dtype, None, data, tuple(int(d) for d in shape))

    def as_core(self) -> tuple:
        srcs = self.sources if isinstance(self.sources, list) else list(self.sources)
        shape = list(self.shape) if self.shape is not None else None
        return (self.name, self.dtype, self.op, srcs, self.weights, self.data, shape, self.expr)


@dataclass
class Plan:
    """Output tensors over ``inputs``: paths, or checkpoints already open (used as they are)."""

    inputs: Sequence[Path | Checkpoint | _core.Checkpoint]
    outputs: list[Output] = field(default_factory=list)
    accumulate: str = "f32"
    metadata: dict[str, str] = field(default_factory=dict)
    #: what the builder noticed (keys missing from some inputs...), for the report
    notes: dict[str, object] = field(default_factory=dict)
    #: set by :meth:`resolve` (or by a builder that resolved while it opened the inputs)
    resolved: _core.Layout | None = None
    #: working precision of ``expr`` outputs (robust merges): "f64" or "f32"
    precision: str = "f64"

    def input_paths(self) -> list[Path]:
        return [Path(p.path) if isinstance(p, (Checkpoint, _core.Checkpoint)) else Path(p) for p in self.inputs]

    def resolver(self) -> _core.Resolver:
        """A Rust resolver for this plan's outputs; ``add`` each opened input, then ``finish``."""
        return _core.Resolver([o.as_core() for o in self.outputs], len(self.inputs), accumulate=self.accumulate,
                              precision=self.precision)

    def resolve(self) -> _core.Layout:
        """Checks the plan against its inputs and lays out the output, once. Inputs given as paths
        are opened here, one at a time (each header is dropped once its tensors are located);
        opened ones (``Checkpoint`` or the core's own) are used as they are."""
        if self.resolved is None:
            r = self.resolver()
            for i, p in enumerate(self.inputs):
                if isinstance(p, Checkpoint):
                    p = p._core
                r.add(i, p if isinstance(p, _core.Checkpoint) else _core.Checkpoint(os.fspath(p)))
            self.resolved = r.finish(self.metadata)
        return self.resolved


def normalize(weights: Sequence[float]) -> list[float]:
    """Weights normalised in float64 to sum 1."""
    w = [float(x) for x in weights]
    if any(not math.isfinite(x) for x in w):
        raise PlanError(f"weights must be finite: {w}")
    s = math.fsum(w)
    if s == 0 or not math.isfinite(s):
        raise PlanError(f"weights sum to {s}; cannot normalise")
    out = [x / s for x in w]
    check_weight_sizes(out)
    return out


# Largest |weight| accepted: weights that cancel to a small sum (1e300, -1e300, 1) would overflow
# every product to inf and the output to NaN.
MAX_WEIGHT = 1e6


def check_weight_sizes(w: Sequence[float]) -> None:
    big = max((abs(x) for x in w), default=0.0)
    if big > MAX_WEIGHT:
        raise PlanError(f"a weight of {big:.3g} (after normalising) would overflow the sums; "
                        f"weights must stay within +-{MAX_WEIGHT:g}")


KeyFilter = Iterable[str] | Callable[[str], bool] | None


def _key_selector(keys: KeyFilter) -> Callable[[str], bool]:
    if keys is None:
        return lambda k: True
    if callable(keys):
        return keys
    wanted = set(keys)
    return lambda k: k in wanted


def _mean_outputs(checkpoints: Sequence[Checkpoint], order: dict[str, list[int]], weights: Sequence[float] | None,
                  normalize_weights: bool, out_dtype: str | None) -> tuple[list[Output], dict[str, list[str]]]:
    """Per key: a mean over the inputs that have it (a copy of the first for integer tensors),
    and which inputs lack it."""
    n = len(checkpoints)
    missing: dict[str, list[str]] = {}
    outputs: list[Output] = []
    for k, have in order.items():
        infos = [checkpoints[i].info[k] for i in have]
        kinds = {t.is_float for t in infos}
        if len(kinds) > 1:
            a = next(i for i, t in zip(have, infos) if t.is_float)
            b = next(i for i, t in zip(have, infos) if not t.is_float)
            raise MismatchError(
                f"tensor '{k}': {checkpoints[a].info[k].dtype} in {checkpoints[a].path} but "
                f"{checkpoints[b].info[k].dtype} in {checkpoints[b].path}"
            )
        if len(have) < n:
            missing[k] = [os.path.basename(checkpoints[i].path) for i in range(n) if i not in have]
        if not infos[0].is_float:
            outputs.append(Output(k, "copy", [(have[0], k)], None))
            continue
        w = None
        if weights is not None:
            sub = [float(weights[i]) for i in have]
            w = normalize(sub) if normalize_weights else sub
            check_weight_sizes(w)
        outputs.append(Output(k, "mean", [(i, k) for i in have], out_dtype, w))
    return outputs, missing


def mean_plan(
    checkpoints: Sequence[Checkpoint],
    *,
    weights: Sequence[float] | None = None,
    normalize_weights: bool = True,
    dtype: str | None = "F16",
    accumulate: str = "f32",
    keys: KeyFilter = None,
    strict: bool = False,
) -> Plan:
    """The plan for a mean of whole checkpoints: every float tensor is averaged over the inputs
    that have it (in input order), integer/bool tensors are copied from the first input that has
    one. A key missing from some inputs is noted in ``plan.notes["missing"]`` (an error with
    ``strict=True``)."""
    if not checkpoints:
        raise PlanError("mean of no inputs: give at least one file")
    n = len(checkpoints)
    if weights is not None:
        if len(weights) != n:
            raise PlanError(f"{len(weights)} weights for {n} inputs")
        normalize(weights)  # validates
    if accumulate not in ("f32", "f64"):
        raise PlanError(f"accumulate must be 'f32' or 'f64', not '{accumulate}'")
    out_dtype = parse_dtype(dtype)
    select = _key_selector(keys)
    order: dict[str, list[int]] = {}
    for i, ck in enumerate(checkpoints):
        for k in ck.info:
            if select(k):
                order.setdefault(k, []).append(i)
    if not order:
        raise PlanError("no tensors selected" + (" (check keys=)" if keys is not None else ""))
    outputs, missing = _mean_outputs(checkpoints, order, weights, normalize_weights, out_dtype)
    if missing and strict:
        k, files = next(iter(missing.items()))
        more = f" (and {len(missing) - 1} more keys)" if len(missing) > 1 else ""
        raise MismatchError(f"tensor '{k}': missing from {', '.join(files)}{more} (strict=True)")
    meta = {
        "astolfomix.op": "mean",
        "astolfomix.dtype": out_dtype or "same",
        "astolfomix.accumulate": accumulate,
    }
    if weights is not None:
        meta["astolfomix.weights"] = json.dumps([float(x) for x in weights])
    return Plan(
        inputs=list(checkpoints),
        outputs=outputs,
        accumulate=accumulate,
        metadata=meta,
        notes={"missing": missing},
    )
