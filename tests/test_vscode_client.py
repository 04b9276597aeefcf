"""The VS Code extension (clients/vscode): it type-checks (tsc --strict), bundles with esbuild, and its client
code drives the real daemon, started as the extension starts it (in the background) and attached over the
extension's own websocket transport with vscode-jsonrpc: the start failures named with their fix,
initialize, model/load of a tiny model, streaming generate into compare columns, calibration progress,
training with $/progress folded into the chart (loss, validation loss, lr), following a running job from a
new connection (a reload), cancel and resume, export to a chosen folder, SIGTERM.

Needs node and `npm ci` in clients/vscode (node_modules is git-ignored); skipped otherwise.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXT = Path(__file__).resolve().parent.parent / "clients" / "vscode"


def _need_node():
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("node/npm not installed (the VS Code extension needs Node 18+)")
    if not (EXT / "node_modules" / "vscode-jsonrpc").is_dir() or not (EXT / "node_modules" / "esbuild").is_dir():
        pytest.skip("clients/vscode/node_modules missing: run `npm ci` in clients/vscode")


def _run(cmd: list[str], env=None, timeout=300) -> str:
    p = subprocess.run(cmd, cwd=EXT, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, f"`{' '.join(cmd)}` failed ({p.returncode}):\n{out[-6000:]}"
    return out


def test_extension_typechecks_and_builds():
    _need_node()
    _run(["npx", "--no-install", "tsc", "--noEmit", "-p", "."])
    _run(["npm", "run", "--silent", "build"])
    for f in ("extension.js", "webview.js"):
        assert (EXT / "dist" / f).stat().st_size > 1000, f"dist/{f} was not built"
    # the extension host loads a CommonJS module that keeps `vscode` external
    assert 'require("vscode")' in (EXT / "dist" / "extension.js").read_text()


def test_extension_client_against_daemon(tiny_llama_dir, tmp_path):
    _need_node()
    env = dict(os.environ, LORALAB_PYTHON=sys.executable, LORALAB_TEST_MODEL=str(tiny_llama_dir))
    env.pop("LORALAB_HOME", None)  # the node test makes its own data dir per run
    out = _run(["npm", "test", "--silent"], env=env)
    counts = {k: int(v) for k, v in re.findall(r"^# (pass|fail|skipped|cancelled) (\d+)$", out, re.M)}
    assert counts.get("fail") == 0 and counts.get("cancelled") == 0, out[-6000:]
    assert counts.get("skipped") == 0, f"the daemon tests were skipped:\n{out[-3000:]}"
    assert counts.get("pass", 0) >= 17, out[-6000:]
