"""The VS Code extension in a real VS Code in a real browser: code-server (VS Code for the web) with the packaged
VSIX installed, driven by headless chromium through playwright-core (clients/vscode/test/e2e/code_server.mjs),
with the real daemon and the default model: the first-start error names the fix, the panel opens, the plan
shows, calibration reports progress and cancels, training updates the chart and survives a window reload, Base
and LoRA answers stream side by side, export writes files to the folder picked in the save dialog.

clients/vscode/test/e2e/setup.sh installs chromium, Node 24, code-server and playwright-core into
clients/vscode/.e2e/ (cached there). Screenshots of each step go to artifacts/vscode/ (git-ignored);
LORALAB_DOC_IMAGES=1 also copies the panel in both themes to docs/images/ for docs/vscode.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXT = ROOT / "clients" / "vscode"
SHOTS = ROOT / "artifacts" / "vscode"


def _setup() -> dict[str, str]:
    if shutil.which("npm") is None or not (EXT / "node_modules" / "esbuild").is_dir():
        pytest.skip("node/npm or clients/vscode/node_modules missing (make test's setup runs npm ci)")
    p = subprocess.run(["bash", str(EXT / "test" / "e2e" / "setup.sh")], capture_output=True, text=True, timeout=1200)
    assert p.returncode == 0, f"e2e setup failed:\n{(p.stdout + p.stderr)[-5000:]}"
    env_file = Path(p.stdout.strip().splitlines()[-1])
    return dict(line.split("=", 1) for line in env_file.read_text().splitlines() if "=" in line)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, f"code-server exited with {proc.returncode}"
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"code-server did not answer at {url}")


def _stop_daemon(home: Path) -> None:
    for f in (home / "run").glob("loralabd-*.json") if (home / "run").is_dir() else []:
        try:
            pid = json.loads(f.read_text())["pid"]
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.1)
            os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, KeyError):
            pass


@pytest.mark.slow
def test_panel_in_code_server(tmp_path, default_model_path):
    tools = _setup()
    from loralabd.training.demo import demo_dir

    ws = tmp_path / "workspace"
    shutil.copytree(demo_dir(), ws / "pirate")
    (ws / "exports").mkdir()
    home, user = tmp_path / "loralab-home", tmp_path / "user-data"
    (user / "User").mkdir(parents=True)
    bare = tmp_path / "bare-python"  # a Python without LoRA Lab, as a first-time user's python3
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(bare)], check=True, timeout=120)
    settings = user / "User" / "settings.json"
    settings.write_text(json.dumps({
        "loralab.pythonPath": str(bare / "bin" / "python"), "loralab.backend": "numpy", "loralab.chat.maxTokens": 24,
        "workbench.colorTheme": "Default Dark Modern", "workbench.startupEditor": "none",
        "security.workspace.trust.enabled": False, "workbench.tips.enabled": False,
        "files.simpleDialog.enable": True, "window.commandCenter": False, "chat.disableAIFeatures": True,
    }, indent=2))
    if SHOTS.exists():
        shutil.rmtree(SHOTS)
    SHOTS.mkdir(parents=True)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "PYTHONPATH", "DISPLAY", "WAYLAND_DISPLAY")}
    env.update(LORALAB_HOME=str(home), XDG_CONFIG_HOME=str(tmp_path / "config"), XDG_DATA_HOME=str(tmp_path / "data"),
               OPENBLAS_NUM_THREADS="2")
    cs = subprocess.Popen([tools["NODE"], tools["CODE_SERVER"], "--auth", "none", "--bind-addr", f"127.0.0.1:{port}",
                           "--user-data-dir", str(user), "--extensions-dir", tools["EXTENSIONS"], "--disable-telemetry",
                           "--disable-update-check", "--disable-workspace-trust", "--disable-getting-started-override",
                           str(ws)], env=env, stdout=open(tmp_path / "code-server.log", "wb"), stderr=subprocess.STDOUT,
                          start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{port}/healthz", cs)
        cfg = {"url": f"http://127.0.0.1:{port}/?folder={ws}", "settings": str(settings), "python": sys.executable,
               "dataset": str(ws / "pirate"), "exportTo": str(ws / "exports" / "pirate-peft"), "shots": str(SHOTS), "steps": 4}
        drv = subprocess.run([tools["NODE"], str(EXT / "test" / "e2e" / "code_server.mjs"), json.dumps(cfg)],
                             env=dict(env, PLAYWRIGHT_CORE=tools["PLAYWRIGHT_CORE"], CHROMIUM=tools["CHROMIUM"]),
                             capture_output=True, text=True, timeout=900)
        out = drv.stdout + drv.stderr
        (SHOTS / "walkthrough.log").write_text(out)
        daemon_log = (home / "logs" / "loralabd.out").read_text(errors="replace") if (home / "logs" / "loralabd.out").exists() else ""
        assert drv.returncode == 0, f"the walkthrough failed (screenshots in {SHOTS}):\n{out[-6000:]}\n--- daemon log:\n{daemon_log[-3000:]}"
        assert "done" in out
    finally:
        os.killpg(cs.pid, signal.SIGTERM)
        try:
            cs.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(cs.pid, signal.SIGKILL)
        _stop_daemon(home)
    exported = ws / "exports" / "pirate-peft"
    assert (exported / "adapter_model.safetensors").is_file() and (exported / "adapter_config.json").is_file()
    assert "XDG_RUNTIME_DIR" not in daemon_log, daemon_log[-2000:]
    for name in ("01-first-start-error", "02-settings", "03-plan", "04-calibrating", "05-training", "06-reattached",
                 "07-trained-and-compared", "08-exported", "09-light-theme", "panel-dark", "panel-light"):
        assert (SHOTS / f"{name}.png").stat().st_size > 10_000, name
    if os.environ.get("LORALAB_DOC_IMAGES") == "1":
        for theme in ("dark", "light"):
            shutil.copy(SHOTS / f"panel-{theme}.png", ROOT / "docs" / "images" / f"vscode-panel-{theme}.png")
