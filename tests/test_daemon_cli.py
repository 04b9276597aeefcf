"""The loralab CLI end to end against a real background daemon: serve --detach, status, models, plan, train,
chat, adapters, export, stop."""

from __future__ import annotations

import subprocess

from daemon_helpers import PY, conn_file, dataset, env_for, home, tiny_model  # noqa: F401


def loralab(home, *args, ok=True):
    p = subprocess.run([PY, "-m", "loralabd.cli", *args], env=env_for(home), capture_output=True, text=True, timeout=180)
    if ok:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


def test_cli_end_to_end(home, tiny_model, dataset):
    assert loralab(home, "status", ok=False).returncode == 1
    try:
        out = loralab(home, "serve", "--detach").stdout
        assert "started in the background" in out
        pid = conn_file(home)["pid"]
        assert f"pid {pid}" in loralab(home, "status").stdout
        assert "tiny" in loralab(home, "models", "--load", str(tiny_model), "--name", "tiny").stdout
        assert "trainable parameters" in loralab(home, "plan", "--model", "tiny", "--batch", "2", "--seq", "32").stdout
        p = loralab(home, "train", str(dataset), "--model", "tiny", "--adapter", "t1", "--steps", "5", "--batch", "2",
                    "--seq", "32", "--lr", "0.01")
        assert "completed: adapter t1 after 5 steps" in p.stdout
        assert "5/5 loss" in p.stderr and "tok/s" in p.stderr  # the progress bar
        assert "completed" in loralab(home, "train", "--list").stdout
        assert loralab(home, "chat", "--model", "tiny", "--adapter", "t1", "--max-tokens", "5", "the", "quick").stdout.strip()
        assert "t1" in loralab(home, "adapters").stdout
        assert "adapter_model.safetensors" in loralab(home, "export", "t1", "--format", "peft").stdout
        p = loralab(home, "chat", "--model", "tiny", "--adapter", "nope", "hi", ok=False)
        assert p.returncode != 0 and "adapter/list" in p.stderr  # domain error says what to do
    finally:
        loralab(home, "stop")
    assert conn_file(home) is None
