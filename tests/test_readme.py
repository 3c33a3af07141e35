"""The README works from top to bottom (issue 10): every ``$ command`` line of its code blocks
runs in order, in one temp folder, with ``astolfomix`` from this environment, and prints what the
README shows (``...`` in a shown line matches anything; a line of only ``...`` matches any number
of lines). Every ``python`` block runs too, in the same folder. The grid shown is the demo's."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of each fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M)]


def commands(body: str) -> list[tuple[str, list[str]]]:
    """``(command, shown output lines)`` of each ``$ `` line of a block."""
    out: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            out.append((line[2:], []))
        elif out:
            out[-1][1].append(line)
    return out


def _line_re(shown: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(p) for p in shown.split("...")) + r"\Z")


def matches(shown: list[str], got: list[str]) -> bool:
    """Whether ``got`` fits ``shown`` (``...`` wildcards, a lone ``...`` spans lines)."""
    if not shown:
        return not got
    head = shown[0]
    if head.strip() == "...":
        return any(matches(shown[1:], got[i:]) for i in range(len(got) + 1))
    return bool(got) and bool(_line_re(head.rstrip()).match(got[0].rstrip())) and matches(shown[1:], got[1:])


def test_the_readme_grid_is_the_demos_recipe():
    from astolfomix_rs.cli.merge import DEMO_RECIPE

    grids = [b for lang, b in blocks(README.read_text()) if "main=x05-AstolfoMix" in b and "$ " not in b]
    assert grids and "```\n" + grids[0] + "```\n" == DEMO_RECIPE


def test_every_readme_command_runs_and_prints_what_it_shows(tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "200"}
    ran = 0
    for lang, body in blocks(README.read_text()):
        if lang == "python":
            r = subprocess.run([sys.executable, "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
            assert r.returncode == 0, f"python block failed:\n{body}\n{r.stdout}{r.stderr}"
            ran += 1
            continue
        for cmd, shown in commands(body):
            r = subprocess.run(cmd, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            got = (r.stdout + r.stderr).rstrip("\n").splitlines()
            while shown and not shown[-1].strip():
                shown = shown[:-1]
            assert matches(shown, got), f"$ {cmd}\n--- README shows:\n" + "\n".join(shown) + "\n--- got:\n" + "\n".join(got)
            ran += 1
    assert ran >= 10
