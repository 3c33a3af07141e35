"""Recipes: the AstolfoMix grid notation (and a TOML form), model resolution, and the one-pass
per-component merge plan. Recipes are shared between people, so they are treated as untrusted:
they cannot name files outside the models folder or write outside the output folder."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from .._core import __version__
from ..core.plan import Output, Plan, normalize, parse_dtype
from ..core.reader import Checkpoint
from ..errors import AstolfomixError, RecipeError
from ..models.anatomy import Anatomy, detect
from ..models.registry import MODELSPEC
from .hashcache import HashCache
from .hashing import pool_hashes

COMPONENT_LINES = ("unet", "te0", "te1", "te", "vae")
LINE_ALIASES = {"clip_l": "te0", "clip_g": "te1"}

_SEL = re.compile(r"^([A-Za-z0-9_=]+)\s*:(.*)$")
_OUT = re.compile(r"^([A-Za-z0-9_]+)=(.+)$")
_RAW = re.compile(r"^\d+$")
_INTER = re.compile(r"^(\d+)([A-Za-z]+)$")
_FLAG = re.compile(r"^-(\d+[A-Za-z]*)$")
_DASHES = re.compile(r"^-+$")
_COUNT_TAIL = re.compile(r"^\s*(-?)\s*(\d{1,6})\s*$")
#: Model numbers and counts have at most this many digits (a pool of a million models).
MAX_DIGITS = 6


@dataclass(frozen=True)
class ModelId:
    """A model number (``07``) or an intermediate (``05a``), compared numerically."""

    number: int
    suffix: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelId:
        m = _INTER.match(text)
        if m and len(m.group(1)) <= MAX_DIGITS:
            return cls(int(m.group(1)), m.group(2).lower())
        if _RAW.match(text) and len(text) <= MAX_DIGITS:
            return cls(int(text))
        raise ValueError(text)

    def __str__(self) -> str:
        return f"{self.number:02d}{self.suffix}"

    @property
    def raw(self) -> bool:
        return not self.suffix


@dataclass
class Item:
    text: str
    kind: str  # model, placeholder, flagged
    model: ModelId | None = None


@dataclass
class Selection:
    name: str
    items: list[Item]
    count: int | None
    exclude: bool
    line: int
    text: str

    @property
    def listed(self) -> list[ModelId]:
        return [i.model for i in self.items if i.kind == "model" and i.model is not None]

    def selected(self, pool: Iterable[ModelId]) -> list[ModelId]:
        """The models this line selects, in line order (an exclusion list: the pool minus the listed)."""
        if not self.exclude:
            return self.listed
        out = set(self.listed)
        return [m for m in sorted(pool, key=lambda m: (m.number, m.suffix)) if m.raw and m not in out]

    def format(self) -> str:
        items = ",".join(i.text for i in self.items)
        tail = "" if self.count is None else f"={'-' if self.exclude else ''}{self.count}"
        return f"{self.name}: {items}{tail}"


@dataclass
class Recipe:
    lines: list[tuple[str, object]] = field(default_factory=list)  # ("selection"|"output"|"label", obj)
    selections: dict[str, Selection] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    text: str = ""
    # From the TOML form only:
    weights: dict[str, list[float]] = field(default_factory=dict)
    table: dict[str, str] = field(default_factory=dict)
    base: str | None = None
    dtype: str | None = None
    accumulate: str | None = None

    def format(self) -> str:
        """The recipe in the grid notation again."""
        out = []
        for kind, obj in self.lines:
            if kind == "selection":
                out.append(obj.format())  # type: ignore[attr-defined]
            elif kind == "output":
                out.append("=".join(str(x) for x in obj))  # type: ignore[attr-defined]
            else:
                out.append(str(obj))
        return "\n".join(out) + "\n"

    def components(self, output: str | None = None) -> dict[str, Selection]:
        """Component -> selection line used for ``output`` (its own line, if any, for the UNET)."""
        comps = {}
        for name, sel in self.selections.items():
            c = LINE_ALIASES.get(name, name)
            if c in COMPONENT_LINES:
                comps[c] = sel
        if output and output in self.selections and output not in COMPONENT_LINES:
            comps["unet"] = self.selections[output]
        return comps


def _short(text: str, limit: int = 120) -> str:
    text = text.strip()
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _err(n: int, text: str, what: str) -> RecipeError:
    return RecipeError(f"line {n}: {_short(text)!r}: {_short(what, 200)}")


def _parse_items(body: str, n: int, text: str) -> tuple[list[Item], int | None, bool]:
    body = body.strip()
    count, exclude = None, False
    head, eq, tail = body.rpartition("=")  # linear time, whatever the line holds
    m = _COUNT_TAIL.match(tail) if eq else None
    if m:
        body, exclude, count = head.strip(), m.group(1) == "-", int(m.group(2))
    if not body:
        raise _err(n, text, "no items")
    items: list[Item] = []
    seen: dict[ModelId, str] = {}
    for raw in body.split(","):
        t = raw.strip()
        if not t:
            raise _err(n, text, "empty item (two commas in a row?)")
        if _DASHES.match(t):
            items.append(Item(t, "placeholder"))
        elif _FLAG.match(t):
            items.append(Item(t, "flagged", ModelId.parse(t[1:])))
        else:
            try:
                mid = ModelId.parse(t)
            except ValueError:
                raise _err(n, text, f"'{_short(t, 40)}' is not a model number, an intermediate like 05a, '--' or '-NN'") from None
            if mid in seen:
                raise _err(n, text, f"model {mid} is listed twice ('{_short(seen[mid], 40)}' and '{_short(t, 40)}')")
            seen[mid] = t
            items.append(Item(t, "model", mid))
    listed = sum(1 for i in items if i.kind == "model")
    if count is not None and count != listed:
        what = "listed (exclusion list)" if exclude else "selected"
        raise _err(n, text, f"count ={'-' if exclude else ''}{count} but {listed} models are {what}")
    return items, count, exclude


def parse_grid(text: str) -> Recipe:
    """Parses the grid notation exactly as ``recipe-notation.md`` defines it."""
    r = Recipe(text=text)
    for n, line in enumerate(text.splitlines(), start=1):
        s = line.strip()
        if not s or s.startswith("```"):
            r.lines.append(("label", line.rstrip()))
            continue
        sel, out = _SEL.match(s), _OUT.match(s)
        parsed = None
        if sel:
            try:
                parsed = _parse_items(sel.group(2), n, s)
            except RecipeError:
                if not out:
                    raise
        if sel and parsed:
            name = sel.group(1)
            items, count, exclude = parsed
            obj = Selection(name, items, count, exclude, n, s)
            if name in r.selections:
                r.notes.append(f"line {n}: '{name}' redefined (replaces line {r.selections[name].line})")
            r.selections[name] = obj
            r.lines.append(("selection", obj))
        elif out:
            name, f = out.group(1), out.group(2).strip()
            if name in r.outputs:
                r.notes.append(f"line {n}: output '{name}' redefined")
            r.outputs[name] = f
            r.lines.append(("output", (name, f)))
        else:
            r.lines.append(("label", line.rstrip()))
    return r


def load_toml(text: str) -> dict:
    """TOML text -> tables, every failure a RecipeError (nesting deep enough to exhaust the
    parser's recursion included)."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"TOML recipe: {e}") from None
    except RecursionError:
        raise RecipeError("TOML recipe: values nested too deeply") from None


def parse_toml(text: str) -> Recipe:
    """The TOML form::

        base = "01"            # model id or file name in the models folder
        dtype = "f16"
        accumulate = "f32"
        [outputs]
        main = "x05-mix.safetensors"
        [models]               # optional explicit table: id -> file
        "01" = "someModel.safetensors"
        [components.unet]
        models = ["01", "02", "05a"]
        weights = [1, 1, 2]    # optional
    """
    d = load_toml(text)

    def bad(where: str, what: str) -> RecipeError:
        return RecipeError(f"TOML recipe: {_short(where, 80)}: {what}")

    def name(v: object, where: str) -> str:
        # Model ids may be written as numbers (01 is not valid TOML, 1 is); nothing else.
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise bad(where, f"expected a string, not {type(v).__name__}")
        if isinstance(v, int) and not 0 <= v < 10**MAX_DIGITS:
            raise bad(where, f"model number {_short(str(v), 20)} is out of range")
        return str(v)

    def table(v: object, where: str) -> dict:
        if not isinstance(v, dict):
            raise bad(where, f"expected a table, not {type(v).__name__}")
        return v

    known = {"base", "dtype", "accumulate", "outputs", "models", "components"}
    unknown = [k for k in d if k not in known]
    if unknown:
        raise bad(unknown[0], f"unknown key (expected {', '.join(sorted(known))})")
    r = Recipe(text=text)
    r.base = name(d["base"], "base") if "base" in d else None
    r.dtype = name(d["dtype"], "dtype") if "dtype" in d else None
    r.accumulate = name(d["accumulate"], "accumulate") if "accumulate" in d else None
    r.table = {str(k): name(v, f"models.{k}") for k, v in table(d.get("models", {}), "models").items()}
    for out, f in table(d.get("outputs", {}), "outputs").items():
        if not _OUT.match(f"{out}=x"):
            raise bad(f"outputs.{out}", "an output name is letters, digits and _")
        r.outputs[out] = name(f, f"outputs.{out}")
        r.lines.append(("output", (out, r.outputs[out])))
    for n, (comp, spec) in enumerate(table(d.get("components", {}), "components").items(), start=1):
        comp = LINE_ALIASES.get(comp, comp)
        models = spec.get("models") if isinstance(spec, dict) else spec
        if not isinstance(models, list) or not models:
            raise bad(f"components.{comp}", "needs a non-empty 'models' list")
        if isinstance(spec, dict) and set(spec) - {"models", "weights"}:
            raise bad(f"components.{comp}", f"unknown key '{sorted(set(spec) - {'models', 'weights'})[0]}'")
        items, seen = [], set()
        for m in models:
            t = name(m, f"components.{comp}.models")
            key = t
            try:
                key = str(ModelId.parse(t))
            except ValueError:
                pass
            if key in seen:
                raise bad(f"components.{comp}", f"model {_short(t, 40)} is listed twice")
            seen.add(key)
            mid = None
            try:
                mid = ModelId.parse(t)
            except ValueError:
                r.table.setdefault(t, t)  # a file name: resolved through the table
            items.append(Item(t, "model", mid))
        sel = Selection(comp, items, None, False, n, f"components.{comp}")
        r.selections[comp] = sel
        r.lines.append(("selection", sel))
        if isinstance(spec, dict) and "weights" in spec:
            ws = spec["weights"]
            if not isinstance(ws, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in ws):
                raise bad(f"components.{comp}.weights", "expected a list of numbers")
            w = [float(x) for x in ws]
            if not all(math.isfinite(x) for x in w):
                raise bad(f"components.{comp}.weights", "weights must be finite")
            if len(w) != len(models):
                raise bad(f"components.{comp}", f"{len(w)} weights for {len(models)} models")
            r.weights[comp] = w
    return r


def load(path_or_text: str | os.PathLike[str]) -> Recipe:
    """Reads a recipe file (``.toml`` -> TOML form, anything else -> grid)."""
    p = Path(path_or_text)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise RecipeError(f"{p}: cannot read recipe: {e.strerror}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{p}: recipe is not UTF-8 text") from None
    return parse_toml(text) if p.suffix.lower() == ".toml" else parse_grid(text)


# ---------------------------------------------------------------------------------------------
# Model resolution


_POOL = re.compile(r"^_x(\d+)-.*\.safetensors$", re.IGNORECASE)
_INTER_FILE = re.compile(r"^x(\d+)([A-Za-z]+)-.*\.safetensors$", re.IGNORECASE)


#: The table ``astolfomix pool init`` writes into a models folder: ids for files it leaves untouched.
POOL_TABLE = "astolfomix-pool.toml"


def pool_table(models: Path) -> dict[str, str]:
    """The folder's ``astolfomix-pool.toml`` models table (id -> file name), if it has one."""
    p = models / POOL_TABLE
    if not p.is_file():
        return {}
    try:
        d = load_toml(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise RecipeError(f"{p}: cannot read: {e}") from None
    t = d.get("models", {})
    if not isinstance(t, dict) or not all(isinstance(v, str) for v in t.values()):
        raise RecipeError(f"{p}: [models] must map ids to file names")
    return {str(k): v for k, v in t.items()}


def scan_pool(models: Path) -> dict[ModelId, list[Path]]:
    """Files of the models folder by id: ``_x07-name`` is raw 07, ``x05a-name`` intermediate 05a,
    and the ids its ``astolfomix-pool.toml`` table gives to files it left untouched."""
    found: dict[ModelId, list[Path]] = {}
    if not models.is_dir():
        raise RecipeError(f"models folder {models} does not exist")
    for k, name in pool_table(models).items():
        try:
            mid = ModelId.parse(k)
        except ValueError:
            raise RecipeError(f"{models / POOL_TABLE}: '{_short(k, 40)}' is not a model number") from None
        found.setdefault(mid, []).append(safe_join(models, name, f"pool table entry {k}"))
    for p in sorted(models.iterdir()):
        m = _POOL.match(p.name)
        mi = None if m else _INTER_FILE.match(p.name)
        if (m or mi) and p.is_symlink():
            _inside(models, p, f"pool file '{p.name}'")
        if m:
            found.setdefault(ModelId(int(m.group(1))), []).append(p)
        elif mi:
            found.setdefault(ModelId(int(mi.group(1)), mi.group(2).lower()), []).append(p)
    return {k: list(dict.fromkeys(v)) for k, v in found.items()}  # a numbered file also in the table once


def safe_join(folder: Path, name: str, what: str) -> Path:
    """``folder/name`` only if ``name`` stays inside ``folder`` (no absolute paths, no ``..``)."""
    if not name or os.path.isabs(name) or name.startswith("~"):
        raise RecipeError(f"{what} '{name}' must be a path inside {folder}")
    full = Path(os.path.normpath(folder / name))
    base = Path(os.path.normpath(folder))
    if full != base and base not in full.parents:
        raise RecipeError(f"{what} '{name}' points outside {folder}; refused")
    _inside(folder, full, f"{what} '{name}'")
    return full


def _inside(folder: Path, path: Path, what: str) -> None:
    """Refuses ``path`` if symbolic links take it out of ``folder`` (a shared recipe or pool must
    not reach files elsewhere on the machine)."""
    real, base = path.resolve(), folder.resolve()
    if real != base and base not in real.parents:
        raise RecipeError(f"{what} is a link to {real}, outside {folder}; refused")


@dataclass
class Resolved:
    files: dict[str, Path]  # item text key (str(ModelId) or table key) -> file
    problems: list[str]


def resolve_models(ids: Iterable[str], models: Path, table: dict[str, str] | None = None) -> Resolved:
    """Maps each id to exactly one file; lists every problem instead of stopping at the first."""
    table = table or {}
    pool = scan_pool(models)
    files: dict[str, Path] = {}
    problems: list[str] = []
    for t in dict.fromkeys(ids):
        key = t
        try:
            key = str(ModelId.parse(t))
        except ValueError:
            pass
        entry = table.get(t) or table.get(key)
        if entry is None:
            # table keys are width-insensitive too
            for k, v in table.items():
                try:
                    if ModelId.parse(k) == ModelId.parse(t):
                        entry = v
                        break
                except ValueError:
                    continue
        if entry is not None:
            try:
                p = safe_join(models, entry, f"model {t}")
            except RecipeError as e:
                problems.append(str(e))
                continue
            if not p.is_file():
                problems.append(f"model {t}: {p} does not exist")
                continue
            files[key] = p
            continue
        try:
            mid = ModelId.parse(t)
        except ValueError:
            problems.append(f"model '{t}': not a model number and not in the models table")
            continue
        hits = pool.get(mid, [])
        if not hits:
            pat = f"_x{mid.number:02d}-*" if mid.raw else f"x{mid.number:02d}{mid.suffix}-*"
            problems.append(f"model {mid}: no file {pat}.safetensors in {models}")
        elif len(hits) > 1:
            problems.append(f"model {mid}: {len(hits)} files match: {', '.join(p.name for p in hits)}")
        else:
            files[key] = hits[0]
    return Resolved(files, problems)


def convention_name(counts: dict[str, int], title: str = "AstolfoMix") -> str:
    """``x{U-1}-Title-x{A-1}te0x{B-1}te1.safetensors`` from the per-component model counts."""
    u = counts.get("unet", 1)
    parts = [f"x{counts[c] - 1}{c}" for c in ("te0", "te1", "te") if c in counts]
    return f"x{u - 1}-{title}-{''.join(parts) or 'x0'}.safetensors"


class MergeProblems(RecipeError):
    """Everything wrong with a merge, found before anything is written."""


def check_name(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("~"):
        raise RecipeError(f"output file '{name}' must be a plain file name inside the output folder")
    return name


def _merge_outputs(base_ck, base_an, comp_files: dict, idx: dict, out_dtype: str | None, weights: dict) -> list:
    """Per key of the base: the mean over the files chosen for its component, else a copy."""

    outputs: list[Output] = []
    for k, bi in base_ck.info.items():
        c = base_an.component_of(k)
        if c is None or c not in comp_files or not bi.is_float:
            outputs.append(Output(k, "copy", [(0, k)], None))
            continue
        w = weights.get(c)
        srcs = comp_files[c]
        outputs.append(Output(k, "mean", [(idx[p], k) for p in srcs if p in idx], out_dtype, normalize(w) if w else None))
    return outputs


def merge_plan(
    recipe: Recipe,
    models: Path,
    *,
    output: str | None = None,
    base: str | None = None,
    dtype: str | None = None,
    accumulate: str | None = None,
    hash_inputs: bool = False,
    hash_cache: HashCache | None = None,
    progress: bool = False,
):
    """Resolves the recipe and builds the one-pass plan of output ``output``. Returns
    (plan, summary); raises MergeProblems listing every problem at once. Each input is opened
    once: checked against the architecture here, then handed to the Rust resolver, which finds
    every tensor-level problem (missing keys, shapes, dtypes). ``hash_inputs``: the inputs' file
    hashes go into the metadata (from ``hash_cache`` when known, else hashed in parallel behind
    one progress bar)."""
    models = Path(models)
    out_name, chosen = _choose(recipe, models, output)
    base_id = base or recipe.base or chosen.get("unet", next(iter(chosen.values())))[0]
    res = resolve_models([i for ids in chosen.values() for i in ids] + [base_id], models, recipe.table)
    problems = list(res.problems)
    files = sorted(set(res.files.values()), key=lambda p: p.name)
    base_path = res.files.get(_key_of(base_id))
    base_ck, base_an = _open_base(base_path, base_id, problems)
    inputs = [base_path] + [p for p in files if p != base_path]
    idx = {p: i for i, p in enumerate(inputs)}
    out_dtype = parse_dtype(dtype or recipe.dtype or "f16")
    comp_files = {c: [res.files[_key_of(t)] for t in ids if _key_of(t) in res.files] for c, ids in chosen.items()}
    plan = Plan(inputs=list(inputs), outputs=_merge_outputs(base_ck, base_an, comp_files, idx, out_dtype, recipe.weights),
                accumulate=accumulate or recipe.accumulate or "f32", notes={"recipe_notes": recipe.notes})
    resolver = plan.resolver()
    kept = _check_and_add(files, chosen, res.files, base_path, base_ck, base_an, idx, resolver, problems, hash_inputs)
    hashes: dict[Path, dict[str, str]] = {}
    if hash_inputs and not problems:
        paths = list(kept)
        got = pool_hashes(paths, want=("file",), cache=hash_cache, progress=progress,
                          opened={i: ck for i, ck in enumerate(kept.values()) if ck is not None})
        hashes = dict(zip(paths, got))
    counts = {c: len(v) for c, v in chosen.items()}
    name = recipe.outputs.get(out_name or "", None) or convention_name(counts)
    meta: dict[str, str] = {}
    if not problems:
        meta = _merge_metadata(recipe, out_name, name, base_path, base_an, comp_files, counts, out_dtype, plan.accumulate,
                               inputs, hashes if hash_inputs else None)
    try:
        plan.resolved = resolver.finish(meta)
    except AstolfomixError as e:
        if not problems or "never opened" not in str(e):  # inputs skipped above were reported already
            problems.append(str(e))
    if problems:
        uniq = list(dict.fromkeys(problems))
        more = f"\n  ... and {len(uniq) - 40} more" if len(uniq) > 40 else ""
        raise MergeProblems(f"cannot merge ({len(uniq)} problems, nothing written):\n  " + "\n  ".join(uniq[:40]) + more)
    plan.metadata = meta
    summary = {
        "output_name": check_name(name),
        "title": out_name or "AstolfoMix",
        "arch": base_an.arch,
        "base": str(base_path),
        "components": {c: [str(p) for p in v] for c, v in comp_files.items()},
        "counts": counts,
        "weights": {c: recipe.weights[c] for c in comp_files if c in recipe.weights},
        "inputs": [str(p) for p in inputs],
        "bytes_to_read": plan.resolved.bytes_read,
        "output_bytes": plan.resolved.data_len + len(plan.resolved.header),
        "notes": recipe.notes,
    }
    return plan, summary


def _key_of(t: str) -> str:
    try:
        return str(ModelId.parse(t))
    except ValueError:
        return t


def _choose(recipe: Recipe, models: Path, output: str | None) -> tuple[str | None, dict[str, list[str]]]:
    """The output line to build and, per component, the model ids (or TOML file names) it averages."""
    out_name = output or (next(iter(recipe.outputs)) if recipe.outputs else None)
    if output is None and len(recipe.outputs) > 1:
        recipe.notes.append(f"building output '{out_name}', the first of {', '.join(recipe.outputs)} (--output picks another)")
    if out_name is not None and recipe.outputs and out_name not in recipe.outputs and out_name not in recipe.selections:
        raise RecipeError(f"output '{out_name}' is not defined (outputs: {', '.join(recipe.outputs) or 'none'})")
    comps = recipe.components(out_name)
    if not comps:
        raise RecipeError("the recipe selects no component (lines unet, te0, te1, te, vae)")
    pool_ids = list(scan_pool(models))
    chosen: dict[str, list[str]] = {}
    for c, sel in comps.items():
        if sel.items and all(i.model is None for i in sel.items if i.kind == "model"):
            chosen[c] = [i.text for i in sel.items if i.kind == "model"]  # TOML file names
        else:
            chosen[c] = [str(m) for m in sel.selected(pool_ids)] + [
                i.text for i in sel.items if i.kind == "model" and i.model is None
            ]
        if not chosen[c]:
            raise RecipeError(f"line {sel.line}: '{sel.name}' selects no model")
    return out_name, chosen


def _open_base(base_path: Path | None, base_id: str, problems: list[str]) -> tuple[Checkpoint, Anatomy]:
    base_ck = base_an = None
    if base_path is not None:
        try:
            base_ck = Checkpoint(base_path)
            base_an = detect(base_ck)
        except AstolfomixError as e:
            problems.append(str(e))
    if base_ck is None or base_an is None:
        problems.append(f"base model {base_id} could not be used")
        raise MergeProblems("cannot merge:\n  " + "\n  ".join(dict.fromkeys(problems)))
    return base_ck, base_an


def _check_and_add(files, chosen, found, base_path, base_ck, base_an, idx, resolver, problems, hash_inputs):
    """Opens each input once (one parsed header held at a time): checks its architecture and
    components, hands it to the resolver. Returns the inputs by path, with their handles kept
    when they are to be hashed."""
    uses: dict[Path, list[tuple[str, str]]] = {}
    for c, ids in chosen.items():
        for t in ids:
            if _key_of(t) in found:
                uses.setdefault(found[_key_of(t)], []).append((c, t))
    kept: dict[Path, Checkpoint | None] = {}
    for p in files:
        try:
            ck = base_ck if p == base_path else Checkpoint(p)
            an = base_an if p == base_path else detect(ck)
        except AstolfomixError as e:
            problems.append(str(e))
            continue
        fine = True
        for c, t in uses.get(p, []):
            if an.arch != base_an.arch:
                problems.append(f"{c}: model {t} ({p.name}) is {an.arch}, the base is {base_an.arch}")
                fine = False
                continue
            try:
                comp = an.component(c)
            except AstolfomixError as e:
                problems.append(f"{c}: model {t}: {e}")
                fine = False
                continue
            if comp.missing:
                problems.append(f"{c}: model {t} ({p.name}) lacks {len(comp.missing)} keys, e.g. {comp.missing[0]}")
        if fine:
            resolver.add(idx[p], ck._core)  # tensor-level problems are collected there
            kept[p] = ck if hash_inputs else None
        del ck, an
    return kept


#: Longest recipe text stored whole in an output's metadata. Longer ones are stored truncated
#: with their full sha256 (a 35 MB recipe would otherwise make a header no reader accepts).
RECIPE_META_LIMIT = 1 << 20


def stored_recipe(text: str) -> tuple[str, str]:
    """``(text to store, sha256 of the whole text)``; the text is cut at ``RECIPE_META_LIMIT``
    bytes with a note saying so."""
    raw = text.encode("utf-8")
    digest = hashlib.sha256(raw).hexdigest()
    if len(raw) <= RECIPE_META_LIMIT:
        return text, digest
    cut = raw[:RECIPE_META_LIMIT].decode("utf-8", errors="ignore")
    return cut + f"\n... (truncated: the recipe is {len(raw)} bytes, sha256 {digest})", digest


def _merge_metadata(recipe, out_name, name, base_path, base_an, comp_files, counts, out_dtype, acc, inputs, hashes):
    """The output's metadata: the recipe, provenance, and the keys the webui shows."""
    text, digest = stored_recipe(recipe.text)
    provenance = {
        "recipe": text,
        "output": out_name,
        "base": base_path.name,
        "components": {c: [p.name for p in v] for c, v in comp_files.items()},
        "counts": counts,
        "dtype": out_dtype or "same",
        "accumulate": acc,
        "tool": f"astolfomix_rs {__version__}",
    }
    meta = {
        "astolfomix.recipe": text,
        "astolfomix.recipe_sha256": digest,
        "astolfomix.merge": json.dumps(provenance),
        "sd_merge_recipe": json.dumps({"type": "astolfomix-recipe", **provenance}),
        "modelspec.architecture": MODELSPEC.get(base_an.arch, base_an.arch),
        "modelspec.title": Path(name).stem,
    }
    inputs_info = [{"name": p.name, "size": p.stat().st_size} for p in inputs]
    if hashes is not None:
        models_meta = {}
        for i, p in enumerate(inputs):
            h = hashes[p]
            inputs_info[i]["sha256"] = h["sha256"]
            models_meta[h["sha256"]] = {"name": p.stem, "legacy_hash": h["autov1"]}
        meta["sd_merge_models"] = json.dumps(models_meta)
    meta["astolfomix.files"] = json.dumps(inputs_info)
    return meta
