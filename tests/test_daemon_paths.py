"""Where the real daemon may read and write: exports never replace what they should not, a daemon serving remote
clients stays inside its data dir and --allow-path roots, dataset/inspect sends no sample of binary data, the data
dir is private, and a killed daemon's temp leftovers are removed at the next start."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from daemon_helpers import Daemon, dataset, home, run, tiny_model  # noqa: F401 (fixtures)
from loralabd.client import RpcError

TRAIN = {"model": "tiny", "adapter": "a", "steps": 2, "batchSize": 2, "seqLen": 32, "lora": {"r": 4}}


@pytest.fixture
def daemon(request, home):
    ds = []

    def start(*args: str) -> Daemon:
        d = Daemon(home, *args)
        ds.append(d)
        return d
    yield start
    for d in ds:
        d.stop()
        d.log.close()


async def _refused(c, method: str, params: dict, *words: str) -> str:
    with pytest.raises(RpcError) as ei:
        await c.request(method, params)
    assert ei.value.code == -32602, ei.value
    for w in words:
        assert w in str(ei.value), ei.value
    return str(ei.value)


async def _ready(d: Daemon, tiny_model, dataset):
    """A client with the tiny model loaded and adapter `a` trained on `dataset`."""
    c = await d.client()
    await c.initialize("pytest")
    await c.request("model/load", {"source": str(tiny_model), "name": "tiny"})
    job = await c.request("train/start", {**TRAIN, "dataset": str(dataset)})
    assert job["state"] == "completed", job
    return c


def test_export_never_replaces_what_it_should_not(daemon, home, tiny_model, dataset, tmp_path):
    out = tmp_path / "out"
    out.mkdir()

    async def go():
        c = await _ready(daemon(), tiny_model, dataset)
        try:
            exp = lambda fmt, path=None, **kw: {"adapter": "a", "format": fmt, **({"path": str(path)} if path else {}), **kw}  # noqa: E731

            # a user's file: refused without overwrite, untouched; replaced with it
            victim = out / "victim.gguf"
            victim.write_text("my notes")
            await _refused(c, "adapter/export", exp("gguf", victim), "exists", "overwrite: true", "another path")
            assert victim.read_text() == "my notes"
            r = await c.request("adapter/export", exp("gguf", victim, overwrite=True))
            assert r["path"] == str(victim) and victim.read_bytes()[:4] == b"GGUF"

            # never a FIFO, a link or a device, overwrite or not
            fifo = out / "pipe.gguf"
            os.mkfifo(fifo)
            target = out / "target.txt"
            target.write_text("keep")
            link = out / "link.gguf"
            link.symlink_to(target)
            dirlink = out / "dirlink"
            dirlink.symlink_to(out)
            for overwrite in (False, True):
                await _refused(c, "adapter/export", exp("gguf", fifo, overwrite=overwrite), "not a regular file")
                await _refused(c, "adapter/export", exp("gguf", link, overwrite=overwrite), "symbolic link")
                await _refused(c, "adapter/export", exp("peft", link, overwrite=overwrite), "symbolic link")
                await _refused(c, "adapter/export", exp("peft", dirlink, overwrite=overwrite), "symbolic link")
                await _refused(c, "adapter/export", exp("mlx", fifo, overwrite=overwrite), "not a regular file")
                await _refused(c, "adapter/export", exp("peft", "/dev/null", overwrite=overwrite), "device")
                await _refused(c, "adapter/export", exp("peft", victim, overwrite=overwrite), "is a file")
            # the reproductions: a gguf export named after an existing file or device that is not .gguf
            notes = out / "victim.txt"
            notes.write_text("my notes")
            await _refused(c, "adapter/export", exp("gguf", notes), "exists", "overwrite: true")
            bare_fifo = out / "bare-pipe"
            os.mkfifo(bare_fifo)
            for overwrite in (False, True):
                await _refused(c, "adapter/export", exp("gguf", "/dev/full", overwrite=overwrite), "not a regular file")
                await _refused(c, "adapter/export", exp("gguf", bare_fifo, overwrite=overwrite), "not a regular file")
            assert notes.read_text() == "my notes" and stat.S_ISCHR(os.stat("/dev/full").st_mode)
            assert not Path("/dev/full.gguf").exists() and not (out / "victim.txt.gguf").exists()
            assert not (out / "bare-pipe.gguf").exists()
            assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.readlink(link) == str(target)
            assert target.read_text() == "keep" and os.readlink(dirlink) == str(out)
            assert not (out / "adapter_model.safetensors").exists()

            # a folder: new or empty is fine; not empty needs overwrite, and only a folder the export wrote
            empty = out / "empty"
            empty.mkdir()
            r = await c.request("adapter/export", exp("peft", empty))
            assert sorted(Path(f).name for f in r["files"]) == ["adapter_config.json", "adapter_model.safetensors"]
            await _refused(c, "adapter/export", exp("peft", empty), "not empty", "overwrite: true")
            await c.request("adapter/export", exp("peft", empty, overwrite=True))
            await _refused(c, "adapter/export", exp("mlx", empty, overwrite=True), "does not write", "adapter_model")
            mine = out / "mine"
            mine.mkdir()
            (mine / "notes.txt").write_text("mine")
            (mine / "adapter_model.safetensors").write_text("not ours")
            for overwrite in (False, True):
                await _refused(c, "adapter/export", exp("peft", mine, overwrite=overwrite), "another path")
            assert (mine / "notes.txt").read_text() == "mine"
            assert (mine / "adapter_model.safetensors").read_text() == "not ours"

            # gguf into an existing folder: <adapter>.gguf in it
            r = await c.request("adapter/export", exp("gguf", out))
            assert r["path"] == str(out / "a.gguf")

            # the default paths, under the data dir: the second export of each needs overwrite
            for fmt in ("peft", "mlx", "gguf", "merged"):
                first = await c.request("adapter/export", exp(fmt))
                assert Path(first["path"]).parent == home / "exports", first
                await _refused(c, "adapter/export", exp(fmt), "overwrite: true")
                again = await c.request("adapter/export", exp(fmt, overwrite=True))
                assert again["path"] == first["path"] and sorted(again["files"]) == sorted(first["files"])
        finally:
            await c.close()
    run(go())


def test_remote_daemon_stays_inside_its_roots(daemon, home, tiny_model, tmp_path, default_model_path):
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir()
    outside.mkdir()
    rows = "\n".join(json.dumps({"text": f"the quick brown fox jumps over the lazy dog {i}"}) for i in range(12)) + "\n"
    (allowed / "data.jsonl").write_text(rows)
    secret = outside / "secret.jsonl"
    secret.write_text(json.dumps({"text": "the secret"}) + "\n")
    (allowed / "link.jsonl").symlink_to(secret)
    sneaky = allowed / "folder"
    sneaky.mkdir()
    (sneaky / "a.jsonl").write_text(rows)
    (sneaky / "b.jsonl").symlink_to(secret)
    via_dotdot = f"{allowed}/../outside/secret.jsonl"
    # models: one outside, a link to it, and a model inside whose folder links out
    shutil.copytree(tiny_model, outside / "model")
    (allowed / "model-link").symlink_to(outside / "model")
    shutil.copytree(tiny_model, allowed / "model")
    (allowed / "model" / "notes.txt").symlink_to(secret)

    async def go():
        d = daemon("--allow-remote", "--allow-path", str(allowed), "--allow-path", str(tiny_model))
        c = await _ready(d, tiny_model, allowed / "data.jsonl")
        try:
            info = await c.request("dataset/inspect", {"path": str(allowed / "data.jsonl"), "model": "tiny"})
            assert info["examples"] == 12 and "quick brown fox" in info["sample"]
            for bad in (secret, allowed / "link.jsonl", via_dotdot, sneaky):
                msg = await _refused(c, "dataset/inspect", {"path": str(bad), "model": "tiny"}, "--allow-path")
                assert "the secret" not in msg
                await _refused(c, "evaluate", {"model": "tiny", "dataset": str(bad), "seqLen": 32}, "outside")
                await _refused(c, "train/start", {**TRAIN, "adapter": "b", "dataset": str(bad)}, "outside")
            await _refused(c, "train/start", {**TRAIN, "adapter": "b", "dataset": str(allowed / "data.jsonl"),
                                              "validation": str(secret)}, "validation", "outside")
            peft = await c.request("adapter/export", {"adapter": "a", "format": "peft"})  # the data dir: fine
            shutil.copytree(peft["path"], outside / "peft-copy")  # what a local daemon would import
            await _refused(c, "adapter/import", {"path": str(outside / "peft-copy"), "name": "b", "model": "tiny"},
                           "outside")
            await c.request("adapter/export", {"adapter": "a", "format": "gguf", "path": str(allowed / "a.gguf")})
            for target in (outside / "a.gguf", f"{allowed}/../outside/x", outside / "peft"):
                fmt = "gguf" if str(target).endswith(".gguf") else "peft"
                await _refused(c, "adapter/export", {"adapter": "a", "format": fmt, "path": str(target)}, "outside")
            assert sorted(p.name for p in outside.iterdir()) == ["model", "peft-copy", "secret.jsonl"]
            for bad in (outside / "model", allowed / "model-link", f"{allowed}/../outside/model", allowed / "model"):
                await _refused(c, "model/load", {"source": str(bad), "name": "x"}, "model", "outside", "--allow-path")
            assert [m["id"] for m in (await c.request("model/list"))["models"]] == ["tiny"]  # nothing was loaded
            # the default model and models installed as packages load (tiny itself came from an --allow-path root)
            pkg = await c.request("model/load", {"source": str(default_model_path), "name": "pkg"})
            assert pkg["source"] == str(default_model_path.resolve())
            assert (allowed / "a.gguf").read_bytes()[:4] == b"GGUF"
            # what is inside the roots is still served: an import from the data dir
            imp = await c.request("adapter/import", {"path": peft["path"], "name": "b", "model": "tiny"})
            assert imp["name"] == "b"
        finally:
            await c.close()
    run(go())


def test_remote_needs_existing_allow_path(home, tmp_path):
    import subprocess

    from daemon_helpers import PY, env_for

    p = subprocess.run([PY, "-m", "loralabd.server.main", "--allow-remote", "--allow-path", str(tmp_path / "nope")],
                       env=env_for(home), capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "--allow-path" in p.stderr and "no such folder" in p.stderr


def test_inspect_sends_no_sample_of_binary_data(daemon, home, tiny_model, tmp_path):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(bytes(range(256)) * 64)  # NUL bytes: the reader skips it
    ctrl = tmp_path / "ctrl.txt"
    ctrl.write_bytes(bytes(range(1, 32)) * 40 + b"then some words")  # valid UTF-8 without NUL, not text
    text = tmp_path / "notes.txt"
    text.write_text("plain notes are text data, so their sample is shown")

    async def go():
        c = await daemon().client()
        try:
            await c.request("model/load", {"source": str(tiny_model), "name": "tiny"})
            for f in (binary, ctrl):
                info = await c.request("dataset/inspect", {"path": str(f), "model": "tiny"})
                assert info["sample"] == "", info["sample"][:80]
                assert any(q["message"].startswith("not_text") for q in info["problems"]), info["problems"]
            info = await c.request("dataset/inspect", {"path": str(text), "model": "tiny"})
            assert "plain notes" in info["sample"] and info["problems"] == []
        finally:
            await c.close()
    run(go())


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(os.lstat(p).st_mode) for p in [root, *root.rglob("*")]
            if not p.is_symlink()}


def test_data_dir_is_private(daemon, home, tiny_model, dataset):
    # what an older daemon left: 0755 folders, 0644 files
    os.chmod(home, 0o755)
    (home / "logs").mkdir(mode=0o755)
    (home / "logs" / "old.log").write_text("old\n")
    os.chmod(home / "logs" / "old.log", 0o644)
    (home / "jobs.sqlite").touch(mode=0o644)  # an empty file is an empty SQLite database
    os.chmod(home / "jobs.sqlite", 0o644)
    os.chmod(home / "logs", 0o755)

    async def go():
        c = await _ready(daemon(), tiny_model, dataset)
        try:
            await c.request("adapter/export", {"adapter": "a", "format": "peft"})
            await c.request("adapter/export", {"adapter": "a", "format": "gguf"})
        finally:
            await c.close()
    run(go())
    modes = _modes(home)
    for part in ("jobs.sqlite", "logs/old.log", "logs/loralabd.log", "adapters/a/adapter_model.safetensors",
                 "exports/a-peft/adapter_config.json", "exports/a.gguf"):
        assert part in modes, sorted(modes)
    assert any(k.startswith("checkpoints/") and k.endswith("state.safetensors") for k in modes)
    leaky = {k: oct(m) for k, m in modes.items() if m & 0o077 and k != "daemon.log"}  # daemon.log: the test's own
    assert not leaky, leaky
    assert modes["."] == 0o700 and modes["jobs.sqlite"] == 0o600 and modes["logs"] == 0o700


def test_temp_leftovers_removed_at_start(daemon, home):
    ck, ad, ex = home / "checkpoints", home / "adapters", home / "exports"

    def tree(p: Path, files=("state.safetensors",)):
        p.mkdir(parents=True)
        for f in files:
            (p / f).write_text("x")
        return p

    gone = [tree(ck / "job1" / ".tmp-step-00000004-4242"), tree(ck / "job1" / ".old-step-00000002-4242"),
            tree(ad / ".pirate.k3j_x9q2", ("adapter_model.safetensors",)), tree(ad / ".pirate.old-0a1b2c3d"),
            tree(ad / ".gone.deleted-00ff00ff"), tree(ex / ".a-merged.ab12cd34")]
    (ex / ".a.gguf.partial").write_text("half")
    gone.append(ex / ".a.gguf.partial")
    kept = [tree(ck / "job1" / "step-00000002"), tree(ck / "job1" / "step-00000003"), tree(ad / "pirate"),
            tree(ad / ".notes"), tree(ex / "a-peft")]
    (ad / "README.txt").write_text("mine")
    kept.append(ad / "README.txt")
    # a replace cut between its two renames: the previous copy is all there is, so it comes back
    tree(ck / "job2" / ".old-step-00000005-77", ("trainer.json",))
    tree(ad / ".solo.old-89abcdef", ("loralab.json",))

    d = daemon()
    assert d.alive()
    for p in gone:
        assert not p.exists(), p
    for p in kept:
        assert p.exists(), p
    assert (ck / "job2" / "step-00000005" / "trainer.json").exists() and not (ck / "job2" / ".old-step-00000005-77").exists()
    assert (ad / "solo" / "loralab.json").exists() and not (ad / ".solo.old-89abcdef").exists()
    log = (home / "logs" / "loralabd.log").read_text()
    assert f"removed {len(gone)} temp leftover(s)" in log and ".tmp-step-00000004-4242" in log, log[-2000:]
