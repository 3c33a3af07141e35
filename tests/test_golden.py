"""Bytes that must not change by accident: the sha256 of the demo merge, the 42-model recipe
merge, an export/import round trip and plain means, recorded before the typed-plan refactor
(``golden.json``; regenerate with ``python tests/golden.py`` only for a deliberate change)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from golden import outputs

EXPECTED = json.loads((Path(__file__).parent / "golden.json").read_text())


def test_outputs_are_byte_identical_to_the_recorded_ones(tmp_path):
    got = outputs(tmp_path)
    assert got == EXPECTED


def test_torch_path_gives_the_same_bytes(tmp_path):
    pytest.importorskip("torch")
    got = outputs(tmp_path, device="torch-cpu")
    # torch rounds f64 to bf16 through f32 (a double rounding), the engine once: that output may
    # differ by 1 ulp and is left out; every other one is identical.
    for name in ("recipe42", "mean", "convert_f32"):
        assert got[name] == EXPECTED[name], name
