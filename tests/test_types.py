"""Issue 11: loralabd/ type-checks clean under mypy with pyproject.toml's [tool.mypy] config — the handlers'
params and results are the generated protocol TypedDicts, the engine users go through engine/interface.py."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_clean():
    if importlib.util.find_spec("mypy") is None:
        pytest.skip("mypy is not installed in this interpreter; `pip install -e .[test]` installs it")
    r = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml")],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"mypy found type errors:\n{r.stdout}{r.stderr}"
