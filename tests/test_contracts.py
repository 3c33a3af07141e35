"""The contracts between the layers: one open (and one header parse) per input file for every
command, every Rust error kind mapped to a Python class, the ``_core.pyi`` stub matching the
extension, and no import cycles in the package."""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path

import astolfomix_rs as am
import numpy as np
import pytest
from astolfomix_rs import _core, errors
from astolfomix_rs.cli import main
from astolfomix_rs.tools.synth import make_checkpoint

PKG = Path(am.__file__).parent


# ---------------------------------------------------------------------------------------------
# One open per input


def opens(fn) -> int:
    before = _core.open_count()
    fn()
    return _core.open_count() - before


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    d = tmp_path_factory.mktemp("pool")
    for i in range(1, 5):
        make_checkpoint(d / f"_x{i:02d}-m{i}.safetensors", "sdxl", factor=64, seed=i, seeds={"clip_l": 0})
    make_checkpoint(d / "sd1.safetensors", "sd1", factor=64, seed=9)
    (d / "r.txt").write_text("unet: 01,02,03=3\nte0: 04\n")
    return d


def files(pool):
    return [str(pool / f"_x{i:02d}-m{i}.safetensors") for i in range(1, 5)]


@pytest.mark.parametrize("device", ["cpu", "torch-cpu"])
def test_merge_opens_each_input_once(pool, tmp_path, device):
    if device != "cpu":
        pytest.importorskip("torch")
    argv = ["merge", str(pool / "r.txt"), "--models", str(pool), "--out-dir", str(tmp_path), "--hash-inputs",
            "--device", device, "--json"]
    assert opens(lambda: main(argv)) == 4  # models 01-04 (04 is also the base)


def test_mean_opens_each_input_once(pool, tmp_path):
    assert opens(lambda: am.mean(files(pool), tmp_path / "m.safetensors", progress=False)) == 4


@pytest.mark.parametrize("cmd", [["hash"], ["inspect", "--nan"], ["inspect", "--hashes", "--no-cache"],
                                 ["compare", "--distance"]])
def test_reading_commands_open_each_file_once(pool, cmd, capsys):
    fs = files(pool)
    assert opens(lambda: main([cmd[0], *fs, *cmd[1:], "--json"])) == len(fs)
    capsys.readouterr()


def test_export_and_import_open_each_file_once(pool, tmp_path):
    te0 = tmp_path / "te0.safetensors"
    assert opens(lambda: main(["export", files(pool)[0], "te0", str(te0)])) == 1
    out = tmp_path / "sd1_xl.safetensors"
    assert opens(lambda: main(["import", str(pool / "sd1.safetensors"), str(te0), "te", str(out)])) == 2
    assert opens(lambda: main(["import", str(out), files(pool)[1], "te", "--in-place"])) == 2


# ---------------------------------------------------------------------------------------------
# Errors


def test_every_core_error_kind_has_a_python_class():
    kinds = _core.error_kinds()
    assert "PlanError" in kinds and len(kinds) == len(set(kinds))
    for k in kinds:
        cls = getattr(errors, k)
        assert issubclass(cls, errors.AstolfomixError) or cls is KeyboardInterrupt, k


def test_bad_arguments_to_the_core_raise_plan_errors(tmp_path):
    with pytest.raises(errors.PlanError, match="accumulate"):
        _core.Resolver([], 0, accumulate="f16")
    with pytest.raises(errors.PlanError, match="unknown op"):
        _core.Resolver([("x", None, "nope", [], None, None, None, None)], 0)
    with pytest.raises(errors.PlanError, match="bytes given"):
        data = np.zeros(3, np.uint8)
        _core.Resolver([("x", "F32", "constant", [], None, data, [1], None)], 0)


def test_dtype_table_is_shared():
    from astolfomix_rs.core.reader import FLOAT_DTYPES, ITEMSIZE

    table = {n: (b, avg) for n, b, avg in _core.dtypes()}
    assert table["F8_E4M3"] == (8, True) and table["BF16"] == (16, True) and table["F4"] == (4, False)
    assert ITEMSIZE["F8_E5M2"] == 1 and "F4" not in ITEMSIZE
    assert set(FLOAT_DTYPES) == {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}


# ---------------------------------------------------------------------------------------------
# The stub


def _stub():
    tree = ast.parse((PKG / "_core.pyi").read_text())
    funcs, classes = {}, {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            funcs[node.name] = node
        elif isinstance(node, ast.ClassDef):
            classes[node.name] = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
    return funcs, classes


def _stub_params(fn: ast.FunctionDef) -> list[tuple[str, str, bool]]:
    a = fn.args
    out = []
    pos = a.posonlyargs + a.args
    defaults = [False] * (len(pos) - len(a.defaults)) + [True] * len(a.defaults)
    for p, d in zip(pos, defaults):
        if p.arg != "self":
            out.append((p.arg, "POSITIONAL_OR_KEYWORD", d))
    for p, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((p.arg, "KEYWORD_ONLY", d is not None))
    return out


def _real_params(obj) -> list[tuple[str, str, bool]]:
    sig = inspect.signature(obj)
    return [(p.name, p.kind.name, p.default is not inspect.Parameter.empty)
            for p in sig.parameters.values() if p.name not in ("self", "$self")]


def test_stub_matches_the_extension():
    funcs, classes = _stub()
    public = {n for n in dir(_core) if not n.startswith("_")}
    assert public == set(funcs) | set(classes), "names in _core and _core.pyi differ"
    for name, fn in funcs.items():
        assert _stub_params(fn) == _real_params(getattr(_core, name)), name
    for cname, methods in classes.items():
        cls = getattr(_core, cname)
        for mname, fn in methods.items():
            if mname == "__buffer__":
                assert hasattr(cls, "__buffer__") or hasattr(cls, "__getbuffer__") or memoryview, cname
                continue
            if mname == "__init__":
                if cls.__text_signature__ is None:
                    pytest.fail(f"{cname} has no constructor but the stub declares one")
                assert _stub_params(fn) == _real_params(cls), cname
                continue
            attr = inspect.getattr_static(cls, mname)
            props = [d for d in fn.decorator_list if isinstance(d, ast.Name) and d.id == "property"]
            if props:
                assert not callable(attr) or hasattr(attr, "__get__"), f"{cname}.{mname}"
                continue
            assert _stub_params(fn) == _real_params(getattr(cls, mname)), f"{cname}.{mname}"


# ---------------------------------------------------------------------------------------------
# Layers


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name relative to it (``core.plan``, ``cli``...)."""
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports, at any depth (function-level imports too)."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    pkg = [p for p in pkg if p]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level:
            base = pkg[: len(pkg) - (node.level - 1)]
        elif (node.module or "").startswith("astolfomix_rs"):
            base = []
            node = ast.ImportFrom(module=node.module.removeprefix("astolfomix_rs").lstrip("."), names=node.names)
        else:
            continue
        target = ".".join(base + ([node.module] if node.module else []))
        if node.module is None or target not in mods:
            for a in node.names:  # `from . import x`: x may be a module or a name in the package
                sub = ".".join(x for x in (target, a.name) if x)
                out.add(sub if sub in mods else target)
        else:
            out.add(target)
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {m: {i for i in _imports(m, p, mods) if i in mods and i != m} for m, p in mods.items()}
    cycles = []

    def visit(m, stack):
        for n in graph.get(m, ()):
            if n == "":
                continue  # the package root (`from .. import __version__`) imports no command module
            if n in stack:
                cycles.append(stack[stack.index(n):] + [n])
            elif len(stack) < len(graph):
                visit(n, stack + [n])

    for m in graph:
        visit(m, [m])
    assert not cycles, json.dumps(sorted({" -> ".join(c) for c in cycles}))
    assert "core.plan" in graph and "core.reader" in graph["core.plan"]


def test_layers_import_only_downwards():
    """core knows nothing of models, commands or the CLI; models nothing of commands or the CLI;
    and nothing but the tools, the demo and the CLI's bench imports the synthetic generator."""
    mods = _modules()
    graph = {m: {i for i in _imports(m, p, mods) if i in mods and i != m} for m, p in mods.items()}
    rank = {"core": 0, "models": 1, "commands": 2, "tools": 3, "cli": 4}
    for m, deps in graph.items():
        top = m.split(".")[0]
        for d in deps:
            dtop = d.split(".")[0]
            if top in rank and dtop in rank:
                assert rank[dtop] <= rank[top], f"{m} imports {d}"
    users = {m for m, deps in graph.items() if "tools.synth" in deps}
    assert all(u.startswith("tools") or u == "cli.merge" for u in users), users


def test_importing_the_package_and_cli_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, astolfomix_rs, astolfomix_rs.cli; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
