"""What the VS Code panel shows of the daemon: the default model's display name, and a daemon without a
display (as VS Code starts it) that does not print libwayland's XDG_RUNTIME_DIR error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def test_default_model_has_its_display_name(default_model):
    assert default_model.name == "SmolLM2-135M-Instruct"


def test_webgpu_runtime_is_quiet_without_a_display():
    pytest.importorskip("wgpu")
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "DISPLAY", "WAYLAND_DISPLAY", "NODEVICE_SELECT")}
    code = "from loralabd.engine.webgpu.runtime import get_runtime, NoAdapterError\n" \
           "try:\n    get_runtime()\nexcept NoAdapterError:\n    print('no adapter')\n"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    if "no adapter" in p.stdout:
        pytest.skip("no WebGPU adapter (install mesa-vulkan-drivers for lavapipe)")
    assert "XDG_RUNTIME_DIR" not in p.stderr, p.stderr
