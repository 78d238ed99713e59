"""Benchmarks do not rot: each runs in --quick mode and ends with one JSON object (no timing asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHES = sorted(p for p in (Path(__file__).parents[1] / "benchmarks").glob("*.py") if not p.name.startswith("_"))


@pytest.mark.slow
@pytest.mark.parametrize("path", BENCHES, ids=[p.stem for p in BENCHES])
def test_benchmark_quick_mode_prints_json(path):
    out = subprocess.run([sys.executable, str(path), "--quick"], capture_output=True, text=True, timeout=300,
                         check=True).stdout.strip().splitlines()
    result = json.loads(out[-1])
    assert result["name"] == path.stem and result["ratio"] > 0 and result["quick"] is True
