"""The adapter store: our adapters by name in the data directory (<data>/adapters/<name>/).

Each entry is a PEFT directory (adapter_model.safetensors + adapter_config.json) — so a stored
adapter is already an export — plus loralab.json (base model identity, step, notes). Entries are
written whole into a temporary directory and renamed into place: a crash leaves the old entry or
the new one, never half of either.
"""

from __future__ import annotations

import json
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from . import faults
from .engine.lora import LoraAdapter
from .errors import LoraLabError
from .export import replace_dir
from .export.peft import load_peft, save_peft
from .models.args import ModelArgs

META = "loralab.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class AdapterStoreError(LoraLabError):
    """A name that is not valid, or an adapter that is not there."""


def base_fingerprint(args: ModelArgs) -> dict:
    """What an adapter must match to apply to a base: architecture and every shape."""
    keys = ("arch", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "vocab_size")
    return {k: getattr(args, k) for k in keys}


class AdapterStore:
    def __init__(self, root: Path | str | None = None):
        if root is None:
            from .paths import adapters_dir

            root = adapters_dir()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _dir(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.match(name):
            raise AdapterStoreError(f"adapter name {name!r} is not valid; use 1-64 letters, digits, '.', '_' or '-', "
                                    "starting with a letter or digit")
        return self.root / name

    def path(self, name: str) -> Path:
        """The adapter's directory (a PEFT directory plus loralab.json), checked for a valid name."""
        return self._dir(name)

    def save(self, name: str, adapter: LoraAdapter, args: ModelArgs, *, base_model: str | None = None,
             meta: dict | None = None) -> Path:
        """Store (or replace) an adapter under `name`."""
        final = self._dir(name)
        tmp = Path(tempfile.mkdtemp(dir=self.root, prefix="." + name + "."))
        try:
            save_peft(adapter, tmp, args, base_model_name_or_path=base_model)
            info = {"name": name, "base_model": base_model, "base": base_fingerprint(args),
                    "config": adapter.config.to_dict(), "n_params": adapter.n_params(),
                    "saved_at": time.time(), **(meta or {})}
            with open(tmp / META, "wb") as f:
                faults.write(f, (json.dumps(info, indent=2) + "\n").encode(), "adapter")  # unless a test injects a fault
            replace_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final

    def info(self, name: str) -> dict:
        d = self._dir(name)
        if not (d / META).exists():
            raise AdapterStoreError(f"no adapter named {name!r} in {self.root}; list them with adapter/list")
        return json.loads((d / META).read_text())

    def load(self, name: str, args: ModelArgs) -> LoraAdapter:
        """The adapter, checked against the base it is about to be used with."""
        info = self.info(name)
        want, have = info.get("base", {}), base_fingerprint(args)
        diff = {k: (want[k], have[k]) for k in want if k in have and want[k] != have[k]}
        if diff:
            what = ", ".join(f"{k} {a} (adapter) vs {b} (model)" for k, (a, b) in diff.items())
            raise AdapterStoreError(f"adapter {name!r} was trained on {info.get('base_model') or 'another base'}: "
                                    f"{what}; load that model to use it")
        return load_peft(self._dir(name), args)

    def list(self) -> list[dict]:
        out = []
        for d in sorted(self.root.iterdir()):
            if d.is_dir() and not d.name.startswith(".") and (d / META).exists():
                try:
                    out.append(json.loads((d / META).read_text()))
                except ValueError:
                    continue  # a damaged entry is skipped, not fatal
        return out

    def delete(self, name: str) -> None:
        d = self._dir(name)
        if not d.exists():
            raise AdapterStoreError(f"no adapter named {name!r} in {self.root}")
        trash = self.root / ("." + name + ".deleted-" + secrets.token_hex(4))
        d.rename(trash)  # atomic: the name is gone at once; the files go after
        shutil.rmtree(trash, ignore_errors=True)
