"""Robust merge recipes: sd-mecha ``.mecha`` files as merge authors publish them, and a Python API
that builds the same graphs. A graph is compiled per key into one plan output: linear nodes fold
into one coefficient per input, each robust node (TIES, geometric median, model stock) becomes a
term of an ``expr`` output that the engine runs as streaming passes (``rust/robust.rs``).

Semantics follow sd-mecha 1.1 (see README "Robust merges"), with these choices made explicit:
``vote_sgn=False`` elects by sign count and ``True`` by mass unless ``vote`` overrides it;
``ties_sum_extended``'s ``apply_stock`` is read as sd-mecha reads it (``False`` applies model stock,
``True`` does not); a model stock row whose factor divides by zero gets 0 instead of inf."""

from __future__ import annotations

import json
import math
import os
import secrets
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .. import _core
from .._core import __version__
from ..core.plan import Output, Plan, parse_dtype
from ..core.reader import FLOAT_DTYPES, Checkpoint
from ..errors import AstolfomixError, RecipeError
from ..models.anatomy import detect
from .recipe import load_toml, safe_join, stored_recipe

# ---------------------------------------------------------------------------------------------
# The graph


#: working precisions of the robust merges (``rust/real.rs``)
PRECISIONS = ("f32", "f64")

@dataclass(frozen=True, eq=False)
class Node:
    """A recipe node: a model file or a merge of other nodes."""

    line: int = 0


@dataclass(frozen=True, eq=False)
class ModelNode(Node):
    path: str = ""


@dataclass(frozen=True, eq=False)
class MergeNode(Node):
    method: str = ""
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


def model(path: str | os.PathLike[str]) -> ModelNode:
    """A model file (inside the models folder, for recipes run by the CLI)."""
    return ModelNode(path=os.fspath(path))


def merge(method: str, *args: Any, **kwargs: Any) -> MergeNode:
    """A merge node, checked now: ``merge("ties_sum", d1, d2, k=0.5)``."""
    node = MergeNode(method=method, args=tuple(args), kwargs=dict(kwargs))
    problems = _check_node(node)
    if problems:
        raise RecipeError("; ".join(problems))
    return node


# name -> (number of node arguments or None for any, {parameter: default})
METHODS: dict[str, tuple[int | None, dict[str, Any]]] = {
    "subtract": (2, {}),
    "add_difference": (2, {"alpha": 1.0}),
    "weighted_sum": (2, {"alpha": 0.5}),
    "n_average": (None, {}),
    "ties_sum": (None, {"k": 1.0, "vote_sgn": False}),
    "ties_sum_extended": (None, {"k": 0.2, "vote_sgn": False, "apply_stock": False, "apply_median": False,
                                 "cos_eps": 1e-6, "eps": 1e-6, "maxiter": 100, "ftol": 1e-20}),
    "geometric_median": (None, {"eps": 1e-6, "maxiter": 100, "ftol": 1e-20}),
    "model_stock": (None, {"cos_eps": 1e-6, "whole": False}),
    "ties_sum_with_dropout": (None, {"probability": 0.9, "della_eps": 0.0, "rescale": True, "k": 0.2,
                                     "vote_sgn": False, "apply_stock": False, "cos_eps": 1e-6,
                                     "apply_median": False, "eps": 1e-6, "maxiter": 100, "ftol": 1e-20,
                                     "seed": None, "rank": "tensor"}),
    "dropout": (None, {"probability": 0.9, "rescale": 1.0, "overlap": 1.0, "overlap_emphasis": 0.0, "seed": None}),
    "isotropic_overrided": (1, {"z_cof": 0.0, "apply_exp": False, "apply_high_dim": False}),
    "isotropic": (1, {"z_cof": 0.0, "apply_exp": False, "apply_high_dim": False}),
    "fallback": (2, {}),
    "pick_component": (1, {"component": None}),
}
ISO = {"isotropic_overrided", "isotropic"}
ROBUST = {"ties_sum", "ties_sum_extended", "geometric_median", "model_stock", "ties_sum_with_dropout", "dropout"}
# Parameters that are not numbers: name -> allowed values (None: any string) or "seed".
_SPECIAL = {"component": None, "rank": ("tensor", "row"), "seed": "seed"}


def _check_node(node: MergeNode) -> list[str]:
    where = f"line {node.line}: " if node.line else ""
    if node.method not in METHODS:
        known = ", ".join(sorted(METHODS))
        return [f"{where}unknown method '{node.method}' (this tool runs: {known})"]
    arity, params = METHODS[node.method]
    out = []
    if arity is not None and len(node.args) != arity:
        out.append(f"{where}{node.method} takes {arity} models, not {len(node.args)}")
    if arity is None and not node.args:
        out.append(f"{where}{node.method} needs at least one model")
    for a in node.args:
        if not isinstance(a, Node):
            out.append(f"{where}{node.method}: argument {a!r} is not a model or merge")
    for k, v in node.kwargs.items():
        if k not in params:
            out.append(f"{where}{node.method} has no parameter '{k}' (it takes {', '.join(params) or 'none'})")
        elif k in _SPECIAL:
            allowed = _SPECIAL[k]
            if allowed == "seed":
                if v is not None and (isinstance(v, bool) or not isinstance(v, int) or abs(v) >= 2**53):
                    out.append(f"{where}{node.method}: seed must be a whole number below 2^53 or null, not {v!r}")
            elif not isinstance(v, str) or (allowed is not None and v not in allowed):
                want = "a string" if allowed is None else " or ".join(f'"{a}"' for a in allowed)
                out.append(f"{where}{node.method}: {k} must be {want}, not {v!r}")
        elif isinstance(v, bool) or isinstance(params[k], bool):
            if not isinstance(v, (bool, int)) or (isinstance(v, int) and v not in (0, 1)):
                out.append(f"{where}{node.method}: {k} must be true or false, not {v!r}")
        elif not isinstance(v, (int, float)) or not math.isfinite(v):
            out.append(f"{where}{node.method}: {k} must be a finite number, not {v!r}")
    if node.method == "pick_component" and "component" not in node.kwargs:
        out.append(f"{where}pick_component needs component=\"...\"")
    prob = node.kwargs.get("probability", 0.0)
    if node.method in ("dropout", "ties_sum_with_dropout") and isinstance(prob, (int, float)) and not 0.0 <= prob <= 1.0:
        out.append(f"{where}{node.method}: probability must be in [0, 1], not {prob!r}")
    overlap = node.kwargs.get("overlap", 1.0)
    if node.method == "dropout" and isinstance(overlap, (int, float)) and not (
            float(overlap).is_integer() and int(overlap) % 2 == 1):
        out.append(f"{where}dropout: only odd whole overlap values (independent masks) are supported, not {overlap!r}")
    return out


# ---------------------------------------------------------------------------------------------
# The .mecha text


@dataclass
class MechaRecipe:
    root: Node
    text: str
    models: list[ModelNode]
    #: working precision asked for by the recipe (TOML ``precision``); None: the default (f64)
    precision: str | None = None


def _tokenize(line: str, n: int) -> list[str]:
    """sd-mecha's tokenizer: spaces split, double quotes group (kept), backslash escapes."""
    tokens: list[str] = []
    cur: list[str] = []
    inside = escape = False
    for ch in line:
        if escape:
            cur.append(ch)
            escape = False
        elif ch == "\\":
            escape = True
        elif ch == '"':
            cur.append(ch)
            inside = not inside
        elif ch == " " and not inside:
            if cur:
                tokens.append("".join(cur))
                cur = []
        else:
            cur.append(ch)
    if inside:
        raise RecipeError(f"line {n}: unmatched quote\n    {line}")
    if escape:
        raise RecipeError(f"line {n}: ends with a backslash")
    if cur:
        tokens.append("".join(cur))
    return tokens


def _value(tok: str, results: list[Any], n: int) -> Any:
    if tok in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[tok]
    if tok.startswith("&"):
        try:
            i = int(tok[1:])
        except ValueError:
            raise RecipeError(f"line {n}: bad reference {tok}") from None
        if not 0 <= i < len(results):
            raise RecipeError(f"line {n}: reference {tok} points to no earlier line (there are {len(results)})")
        return results[i]
    if len(tok) >= 2 and tok[0] == '"' and tok[-1] == '"':
        return tok[1:-1]
    try:
        v = float(tok) if ("." in tok or "e" in tok.lower() or "inf" in tok.lower() or "nan" in tok.lower()) else int(tok)
    except ValueError:
        raise RecipeError(f"line {n}: cannot read '{tok[:40]}' (a number, \"text\", &N, true, false or null)") from None
    if len(tok) > 40 or (isinstance(v, float) and not math.isfinite(v)):
        raise RecipeError(f"line {n}: number '{tok[:40]}' is out of range")
    return v


def parse_mecha(text: str) -> MechaRecipe:
    """Parses a ``.mecha`` recipe: the versioned form (``version 0.1.0``, ``model "path"
    model_config=... merge_space=...``, ``merge "method" &i ... key=value``, ``literal``) or the
    earlier unversioned one (``model "path" "sdxl" "base"``). Every problem is listed, with its
    line, before anything runs."""
    lines = text.split("\n")
    results: list[Any] = []
    problems: list[str] = []
    models: list[ModelNode] = []
    start = 1 if lines and lines[0].strip().startswith("version") else 0
    if start and lines[0].strip() != "version 0.1.0":
        problems.append(f"line 1: this tool reads .mecha version 0.1.0, not '{lines[0].strip()[:40]}'")
    for n, raw in enumerate(lines[start:], start + 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            toks = _tokenize(line, n)
            if not toks:
                raise RecipeError(f"line {n}: nothing to read")
            cmd, rest = toks[0], toks[1:]
            pos, kw = [], {}
            for t in rest:
                if "=" in t and not t.startswith('"'):
                    k, v = t.split("=", 1)
                    kw[k] = _value(v, results, n)
                else:
                    pos.append(_value(t, results, n))
        except RecipeError as e:
            problems.append(str(e).split("\n")[0])
            results.append(None)
            continue
        if cmd == "model":
            if not pos or not isinstance(pos[0], str):
                problems.append(f"line {n}: model needs a \"path\"")
                results.append(None)
                continue
            node = ModelNode(line=n, path=pos[0])
            models.append(node)
            results.append(node)
        elif cmd == "merge":
            if not pos or not isinstance(pos[0], str):
                problems.append(f"line {n}: merge needs a \"method\" name")
                results.append(None)
                continue
            if any(a is None for a in pos[1:]):
                problems.append(f"line {n}: uses a line that could not be read")
            mnode = MergeNode(line=n, method=pos[0], args=tuple(pos[1:]), kwargs=kw)
            problems.extend(_check_node(mnode))
            results.append(mnode)
        elif cmd == "literal":
            results.append(pos[0] if pos else None)
        elif cmd in ("call", "dict"):
            problems.append(f"line {n}: '{cmd}' is the legacy block-weight form; this tool does not run block "
                            "weights: rewrite the recipe with per-model merges (or export it from sd-mecha 1.x)")
            results.append(None)
        else:
            problems.append(f"line {n}: unknown command '{cmd[:40]}' (model, merge, literal)")
            results.append(None)
    if not results and not problems:
        problems.append("the recipe is empty")
    if problems:
        raise RecipeError(f"cannot run the recipe ({len(problems)} problems, nothing written):\n  " + "\n  ".join(problems[:40]))
    root = results[-1]
    if not isinstance(root, Node):
        raise RecipeError("the last line of the recipe must be a model or a merge")
    return MechaRecipe(root=root, text=text, models=models)


def parse_robust_toml(text: str) -> MechaRecipe:
    """The TOML form of a robust merge, the published recipes' shape in a few lines::

        [robust]
        base = "base.safetensors"          # file in the models folder
        models = ["a.safetensors", "b.safetensors"]
        method = "ties_sum_extended"       # any robust method above
        params = { k = 1.0, vote_sgn = true, apply_median = true }
        alpha = 1.0                        # add_difference(base, merged delta, alpha)

    compiles to: base, one ``subtract`` delta per model, the method, ``add_difference``."""
    spec = load_toml(text).get("robust")
    if not isinstance(spec, dict):
        raise RecipeError("TOML recipe: no [robust] table (the grid-recipe TOML form is read by the grid recipes)")
    problems = []
    base, models, method = spec.get("base"), spec.get("models"), spec.get("method")
    params, alpha = spec.get("params", {}), spec.get("alpha", 1.0)
    precision = spec.get("precision")
    if precision is not None and precision not in PRECISIONS:
        problems.append(f"robust.precision must be 'f32' or 'f64', not {precision!r}")
    if not isinstance(base, str):
        problems.append("robust.base must be a file name")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) for m in models):
        problems.append("robust.models must be a non-empty list of file names")
    if not isinstance(method, str) or method not in ROBUST:
        problems.append(f"robust.method must be one of {', '.join(sorted(ROBUST))}, not {method!r}")
    if not isinstance(params, dict):
        problems.append("robust.params must be a table")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        problems.append(f"robust.alpha must be a finite number, not {alpha!r}")
    if problems:
        raise RecipeError("cannot run the recipe:\n  " + "\n  ".join(problems))
    b = ModelNode(path=str(base))
    deltas = [MergeNode(method="subtract", args=(ModelNode(path=m), b)) for m in models]
    node = MergeNode(method=str(method), args=tuple(deltas), kwargs=dict(params))
    bad = _check_node(node)
    if bad:
        raise RecipeError("cannot run the recipe:\n  " + "\n  ".join(bad))
    root = MergeNode(method="add_difference", args=(b, node), kwargs={"alpha": float(alpha)})
    return MechaRecipe(root=root, text=text, models=[b], precision=precision)


def load_mecha(path: str | os.PathLike[str]) -> MechaRecipe:
    """A ``.mecha`` recipe, or a ``.toml`` one with a ``[robust]`` table."""
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"{p}: no such recipe file")
    text = p.read_text(encoding="utf-8", errors="replace")
    return parse_robust_toml(text) if p.suffix == ".toml" else parse_mecha(text)


def is_robust_recipe(path: str | os.PathLike[str]) -> bool:
    """A ``.mecha`` file, or a ``.toml`` one with a ``[robust]`` table."""
    p = Path(path)
    if p.suffix == ".mecha":
        return True
    if p.suffix == ".toml" and p.is_file():
        try:
            return isinstance(load_toml(p.read_text(encoding="utf-8", errors="replace")).get("robust"), dict)
        except RecipeError:
            return False  # the grid-recipe reader reports it
    return False


# ---------------------------------------------------------------------------------------------
# Compiling: per key, a linear part plus robust terms


@dataclass
class Value:
    """A node's value at one key: ``sum coef * input`` plus ``sum a * robust node`` plus
    ``sum b * isotropic(inner value)``."""

    linear: dict[int, float] = field(default_factory=dict)
    robust: list[tuple[float, tuple]] = field(default_factory=list)
    iso: list[tuple[float, dict[str, float], Value]] = field(default_factory=list)

    def scaled(self, c: float) -> Value:
        return Value({i: c * v for i, v in self.linear.items()}, [(c * a, r) for a, r in self.robust],
                     [(c * b, p, v) for b, p, v in self.iso])

    def plus(self, other: Value) -> Value:
        lin = dict(self.linear)
        for i, v in other.linear.items():
            lin[i] = lin.get(i, 0.0) + v
        return Value(lin, self.robust + other.robust, self.iso + other.iso)


def _robust_term(node: MergeNode, points: list[Value], vote: str | None, seed: int | None) -> tuple[float, tuple] | None:
    """(coefficient, (engine method, params, points)) of a robust node, or None where it is 0."""
    kw = {**METHODS[node.method][1], **node.kwargs}
    for p in points:
        if p.robust or p.iso:
            raise RecipeError(f"line {node.line}: {node.method} of a robust merge's result is not supported yet "
                              "(nest linear steps only)")
    pts = [sorted(p.linear.items()) for p in points]
    if node.method in ("dropout", "ties_sum_with_dropout"):
        prob = float(kw["probability"])
        if math.isclose(prob, 1.0):
            return None  # sd-mecha returns 0: every element dropped
        drop = {"p": prob, "seed": float(seed or 0)}  # seeds below 2^53 are exact as floats
        if node.method == "dropout":
            r = (1.0 - prob) ** float(kw["rescale"]) if prob != 0.0 else 1.0
            return (1.0 / r if math.isfinite(r) and r != 0.0 else 1.0), ("masked_mean", drop, pts)
        drop |= {"della_eps": float(kw["della_eps"]), "rank_rows": float(kw["rank"] == "row")}
        name, params, pts = _ties_term("ties_sum_extended", kw, pts, vote)
        return (1.0 / (1.0 - prob) if kw["rescale"] and prob != 0.0 else 1.0), (name, {**params, **drop}, pts)
    return 1.0, _ties_term(node.method, kw, pts, vote)


def _ties_term(method: str, kw: dict[str, Any], pts: list, vote: str | None) -> tuple:
    mass = bool(kw.get("vote_sgn")) if vote is None else vote == "mass"
    if method == "ties_sum":
        return ("ties_sum", {"k": float(kw["k"]), "vote_mass": float(mass)}, pts)
    if method == "ties_sum_extended":
        ties = {"k": float(kw["k"]), "vote_mass": float(mass)}
        if kw["apply_median"]:
            return ("ties_median", {**ties, "eps": float(kw["eps"]), "maxiter": float(kw["maxiter"]),
                                    "ftol": float(kw["ftol"])}, pts)
        if kw["apply_stock"]:  # sd-mecha: True means t = 1
            return ("ties_sum", ties, pts)
        return ("ties_stock", {**ties, "cos_eps": float(kw["cos_eps"])}, pts)
    if method == "geometric_median":
        return ("geometric_median", {"eps": float(kw["eps"]), "maxiter": float(kw["maxiter"]),
                                     "ftol": float(kw["ftol"])}, pts)
    return ("model_stock", {"cos_eps": float(kw["cos_eps"]), "whole": float(bool(kw["whole"]))}, pts)


class Compiler:
    """Evaluates the graph per key. ``has(i, key)`` says whether input ``i`` has the key;
    ``component_of(key)`` names its component (for pick_component)."""

    def __init__(self, index: dict[int, int], has, component_of, vote: str | None):
        self.index, self.has, self.component_of, self.vote = index, has, component_of, vote
        self.seeds: dict[int, int] = {}  # per random node: its seed, the same for every key
        self.seeded: list[MergeNode] = []

    def seed(self, node: MergeNode) -> int | None:
        if node.method not in ("dropout", "ties_sum_with_dropout"):
            return None
        if id(node) not in self.seeds:
            given = node.kwargs.get("seed")
            # sd-mecha draws a fresh seed for null or negative ones; the one drawn is recorded.
            self.seeds[id(node)] = given if isinstance(given, int) and given >= 0 else secrets.randbits(53)
            self.seeded.append(node)
        return self.seeds[id(node)]

    def seed_report(self) -> list[dict[str, Any]]:
        """Every random node's seed (drawn ones included), for the output's metadata."""
        return [{"line": n.line, "method": n.method, "seed": self.seeds[id(n)],
                 "drawn": not (isinstance(n.kwargs.get("seed"), int) and n.kwargs["seed"] >= 0)} for n in self.seeded]

    def value(self, node: Node, key: str) -> Value | None:
        if isinstance(node, ModelNode):
            i = self.index[id(node)]
            return Value({i: 1.0}) if self.has(i, key) else None
        assert isinstance(node, MergeNode)
        m, kw = node.method, {**METHODS[node.method][1], **node.kwargs}
        if m == "fallback":
            first = self.value(node.args[0], key)
            return first if first is not None else self.value(node.args[1], key)
        if m == "pick_component":
            return self.value(node.args[0], key) if self.component_of(key) == kw["component"] else None
        vals = [self.value(a, key) for a in node.args]
        if any(v is None for v in vals):
            return None
        vs: list[Value] = [v for v in vals if v is not None]
        if m == "subtract":
            return vs[0].plus(vs[1].scaled(-1.0))
        if m == "add_difference":
            return vs[0] if math.isclose(kw["alpha"], 0.0) else vs[0].plus(vs[1].scaled(float(kw["alpha"])))
        if m == "weighted_sum":
            a = float(kw["alpha"])
            if math.isclose(a, 0.0):
                return vs[0]
            if math.isclose(a, 1.0):
                return vs[1]
            return vs[0].scaled(1.0 - a).plus(vs[1].scaled(a))
        if m == "n_average":
            out = Value()
            for v in vs:
                out = out.plus(v.scaled(1.0 / len(vs)))
            return out
        if m in ISO:
            if vs[0].iso:
                raise RecipeError(f"line {node.line}: {m} of an isotropic result is not supported")
            params = {k: float(kw[k]) for k in ("z_cof", "apply_exp", "apply_high_dim")}
            return Value({}, [], [(1.0, params, vs[0])])
        term = _robust_term(node, vs, self.vote, self.seed(node))
        return Value({}, [term] if term is not None else [])


def _uniform(lin: dict[int, float]) -> bool:
    n = len(lin)
    return n > 0 and all(abs(c - 1.0 / n) <= 1e-12 for c in lin.values())


def compile_output(key: str, v: Value, dtype: str | None, shared: dict[str, tuple] | None = None) -> Output:
    """One plan output for a key's value: a copy, a uniform mean (the same bytes as ``mean``), or
    an expression. Equal expressions share one object through ``shared`` (a recipe's keys mostly
    have one shape), so the plan does not hold one copy of the N points per key."""
    lin = {i: c for i, c in v.linear.items() if c != 0.0}
    if not v.robust and not v.iso and len(lin) == 1 and next(iter(lin.values())) == 1.0:
        return Output(key, "copy", [(next(iter(lin)), key)], dtype)
    if not v.robust and not v.iso and _uniform(lin):
        return Output(key, "mean", [(i, key) for i in sorted(lin)], dtype)

    def used(w: Value) -> set[int]:
        return set(w.linear) | {i for _, r in w.robust for p in r[2] for i, _ in p} | {
            i for _, _, inner in w.iso for i in used(inner)}

    inputs = sorted(used(v))
    pos = {i: j for j, i in enumerate(inputs)}

    def part(w: Value) -> tuple[list, list]:
        linear = [(pos[i], c) for i, c in sorted(w.linear.items()) if c != 0.0]
        robust = [(a, name, params, [[(pos[i], c) for i, c in p] for p in pts]) for a, (name, params, pts) in w.robust]
        return linear, robust

    linear, robust = part(v)
    iso = [(b, params, part(inner)) for b, params, inner in v.iso]
    expr = (linear, robust, iso)
    if shared is not None:
        expr = shared.setdefault(repr(expr), expr)
    return Output(key, "expr", [(i, key) for i in inputs], dtype, expr=expr)


# ---------------------------------------------------------------------------------------------
# From a recipe to a resolved plan


def _model_nodes(root: Node) -> list[ModelNode]:
    seen: dict[int, ModelNode] = {}

    def walk(n: Any) -> None:
        if isinstance(n, ModelNode):
            seen.setdefault(id(n), n)
        elif isinstance(n, MergeNode):
            for a in n.args:
                walk(a)

    walk(root)
    return list(seen.values())


def mecha_plan(
    recipe: MechaRecipe | Node,
    models: str | os.PathLike[str] | None = None,
    *,
    dtype: str | None = "f16",
    vote: str | None = None,
    precision: str | None = None,
) -> tuple[Plan, dict[str, Any]]:
    """The resolved plan of a recipe (a parsed ``.mecha`` or a graph from :func:`merge`). Model
    paths are resolved inside ``models`` (escapes refused) when given. ``vote`` ("count" or
    "mass") overrides every ``vote_sgn``. ``precision`` ("f64", the default, or "f32": half the
    memory traffic, about sd-mecha's default float32) is the working precision of the element-wise
    steps; it overrides the recipe's own. Returns (plan, summary)."""
    if vote not in (None, "count", "mass"):
        raise RecipeError(f"vote must be 'count' or 'mass', not '{vote}'")
    rec = recipe if isinstance(recipe, MechaRecipe) else MechaRecipe(recipe, "", [])
    precision = precision or rec.precision or "f64"
    if precision not in PRECISIONS:
        raise RecipeError(f"precision must be 'f32' or 'f64', not '{precision}'")
    nodes = _model_nodes(rec.root)
    if not nodes:
        raise RecipeError("the recipe names no model")
    out_dtype = parse_dtype(dtype)
    paths: list[Path] = []
    index: dict[int, int] = {}
    problems: list[str] = []
    for node in nodes:
        try:
            p = safe_join(Path(models), node.path, "model") if models is not None else Path(node.path)
        except RecipeError as e:
            problems.append((f"line {node.line}: " if node.line else "") + str(e))
            continue
        if p not in paths:
            paths.append(p)
        index[id(node)] = paths.index(p)
    # Each input is opened once, by the core; per input, Python keeps only its keys (interned: one
    # string per key name across all inputs) and whether each is a float, not a TensorInfo per
    # tensor (about 1 MB per SDXL input, which made planning grow with N).
    cores: list[_core.Checkpoint] = []
    floats: list[dict[str, bool]] = []
    for p in paths:
        try:
            core = _core.Checkpoint(os.fspath(p))
        except AstolfomixError as e:
            problems.append(str(e))
            continue
        cores.append(core)
        floats.append({sys.intern(n): d in FLOAT_DTYPES for n, d, _, _, _ in core.tensors()})
    if problems:
        raise RecipeError(f"cannot run the recipe ({len(problems)} problems, nothing written):\n  " + "\n  ".join(problems[:40]))
    anatomy = detect(Checkpoint(paths[0], core=cores[0]))
    comp = anatomy.component_of
    compiler = Compiler(index, lambda i, k: floats[i].get(k, False), comp, vote)
    outputs: list[Output] = []
    keys = list(dict.fromkeys(k for f in floats for k in f))
    shared: dict[str, tuple] = {}
    for key in keys:
        owner = next(i for i, f in enumerate(floats) if key in f)
        if not floats[owner][key]:
            outputs.append(Output(key, "copy", [(owner, key)], None))
            continue
        v = compiler.value(rec.root, key)
        if v is not None:
            outputs.append(compile_output(key, v, out_dtype, shared))
    methods = sorted({r[1] for o in outputs for r in _terms(o)}
                     | ({"isotropic"} if any(o.expr and o.expr[2] for o in outputs) else set()))
    rule = vote or "vote_sgn per node (false: count, true: mass)"
    robust_meta: dict[str, Any] = {"methods": methods, "sign_rule": rule, "precision": precision,
                                   "apply_stock": "read as sd-mecha 1.1 (false applies model stock)",
                                   "tool": f"astolfomix_rs {__version__}"}
    seeds = compiler.seed_report()
    if seeds:
        robust_meta |= {"seeds": seeds, "mask_generator": _core.mask_generator(),
                        "della_rank": "ordinal rank of |delta| (ties by position) within the tensor, or the row "
                                      "with rank=\"row\"; keep probability within 1e-4 of the exact formula"}
    meta = {
        "astolfomix.mecha": stored_recipe(rec.text)[0] if rec.text else "(built with the Python API)",
        "astolfomix.robust": json.dumps(robust_meta),
        "astolfomix.files": json.dumps([{"name": p.name, "size": c.file_len} for p, c in zip(paths, cores)]),
    }
    plan = Plan(list(cores), outputs, metadata=meta, precision=precision)
    plan.resolve()
    # The resolved plan keeps the open files; the parsed headers go.
    plan.inputs = list(paths)
    summary = {"inputs": [str(p) for p in paths], "outputs": len(outputs), "methods": methods, "sign_rule": rule,
               "precision": precision,
               "seeds": seeds,
               "passes": _passes(outputs), "bytes_to_read": plan.resolved.bytes_read if plan.resolved else 0}
    return plan, summary


def _terms(o: Output) -> list[tuple]:
    """Every robust term of an output's expression, those inside isotropic steps included."""
    if o.op != "expr" or o.expr is None:
        return []
    return [*o.expr[1], *(t for _, _, inner in o.expr[2] for t in inner[1])]


def _della_table(params: dict[str, float]) -> bool:
    """DELLA masks with tensor-wide ranks: a rank table (and mask bits) from a statistics pass."""
    return bool(params.get("della_eps", 0.0)) and not params.get("rank_rows")


def _passes(outputs: Sequence[Output]) -> dict[str, int]:
    """How many tensors need each kind of pass."""
    out = {"copy/cast/mean": 0, "expr": 0, "statistics pass": 0, "gram pass": 0, "isotropic (whole tensor)": 0}
    for o in outputs:
        if o.op != "expr" or o.expr is None:
            out["copy/cast/mean"] += 1
            continue
        out["expr"] += 1
        out["isotropic (whole tensor)"] += len(o.expr[2])
        for _, name, params, _ in _terms(o):
            if params.get("k", 1.0) < 1.0 or _della_table(params):
                out["statistics pass"] += 1
            if name in ("ties_median", "geometric_median") or params.get("whole"):
                out["gram pass"] += 1
    return out


def peak_bytes(plan: Plan, threads: int) -> int:
    """Estimated peak memory of running ``plan``: per thread one block of every source of the
    widest expression (f64) and its points, plus the whole tensors of a statistics pass (trim
    thresholds, DELLA rank tables and mask bits) or of an isotropic step, plus the plan."""
    widest = trim = 0
    numel = {t[0]: int(t[3]) for t in plan.resolved.tensors()} if plan.resolved is not None else {}
    for o in plan.outputs:
        if o.op == "expr" and o.expr is not None:
            n_points = max((len(r[3]) for r in _terms(o)), default=0)
            widest = max(widest, len(o.sources) + 2 * n_points)
            if o.expr[2]:  # the isotropic step: one whole f64 tensor, its SVD factors and product
                trim = max(trim, 4 * 8 * numel.get(o.name, 0))
            n = numel.get(o.name, 0)
            for r in _terms(o):
                della = _della_table(r[2])
                if r[2].get("k", 1.0) < 1.0 or della:
                    # one whole tensor per point in flight (points run in parallel within 1 GB;
                    # a rank table adds 16 bytes per element), and the DELLA masks as bits
                    per = 24 if della else 8
                    flight = per * n * max(1, min(threads, (1 << 30) // max(per * n, 1)))
                    trim = max(trim, flight + (len(r[3]) * n // 8 if della else 0))
    block = _core.robust_block_len(max(1, widest // 2), 1, False)
    return threads * widest * block * 8 + trim + 64 * len(plan.outputs) * max(1, len(plan.inputs))

