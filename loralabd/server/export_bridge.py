"""adapter/export and adapter/import: saved adapters through loralabd.export (PEFT, llama.cpp GGUF LoRA, MLX, a
merged model; PEFT in).

An export never replaces what it should not: an existing file or a folder that is not empty only with
`overwrite: true`, and then only a regular file or a folder holding nothing but what that format writes;
never a link, a device, a FIFO or a socket. A daemon serving remote clients writes only inside its allowed
roots (access.py).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .. import paths
from ..engine.lora import LoraAdapter
from ..errors import LoraLabError
from ..models.args import ModelArgs
from ..models.load import DEFAULT_MODEL_HF_ID, LoadedModel
from ..protocol import ErrorCode
from ..protocol.types import AdapterInfo, ExportParams, ExportResult, ImportParams
from . import access
from .adapters import adapter_info, adapter_meta, load_adapter, save_adapter
from .errors import DomainError
from .storage import dir_bytes, is_write_fault, storage_error

# What each folder format writes: the only names a folder may hold for an export to replace it
FOLDER_FILES = {
    "peft": ("adapter_model.safetensors", "adapter_config.json"),
    "mlx": ("adapters.safetensors", "adapter_config.json"),
    "merged": ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"),
}
_ATOMIC_TMP = re.compile(r"^\.(.+)\.[^.]+\.tmp$")  # paths.atomic_write_bytes' temp files, left by a crash


def _refuse(out: Path, why: str) -> DomainError:
    return DomainError(ErrorCode.InvalidParams, f"cannot export to {out}: {why}")


def _check_folder(out: Path, fmt: str, overwrite: bool) -> None:
    """A folder export may go to a new path, an empty folder, or (overwrite) a folder of this format's files."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(out, "it is a symbolic link, and exports never write through or replace one; give the "
                           "folder's real path or choose another path")
    if stat.S_ISREG(st.st_mode):
        raise _refuse(out, f"it is a file, and a {fmt} export is a folder; choose another path")
    if not stat.S_ISDIR(st.st_mode):
        raise _refuse(out, "it is not a regular file or folder (a device, FIFO or socket), and exports never "
                           "replace one; choose another path")
    entries = os.listdir(out)
    if not entries:
        return
    if not overwrite:
        raise _refuse(out, "the folder is not empty; pass overwrite: true (loralab export --overwrite) to replace "
                           f"an earlier {fmt} export there, or choose another path")
    ours = FOLDER_FILES[fmt]
    foreign = sorted(e for e in entries if e not in ours and not ((m := _ATOMIC_TMP.match(e)) and m.group(1) in ours))
    special = sorted(e for e in entries if e in ours and not stat.S_ISREG(os.lstat(out / e).st_mode))
    if foreign or special:
        bad = ", ".join((foreign + special)[:5]) + (" ..." if len(foreign) + len(special) > 5 else "")
        raise _refuse(out, f"the folder holds what a {fmt} export does not write ({bad}); an export replaces only "
                           "a folder it wrote — choose another path")


def _check_file(out: Path, overwrite: bool) -> None:
    """A file export may go to a new path or (overwrite) replace a regular file."""
    try:
        st = os.lstat(out)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise _refuse(out, "it is a symbolic link, and exports never write through or replace one; choose another path")
    if not stat.S_ISREG(st.st_mode):
        raise _refuse(out, "it is not a regular file (a folder, device, FIFO or socket), and exports never replace "
                           "one; choose another path")
    if not overwrite:
        raise _refuse(out, "the file exists; pass overwrite: true (loralab export --overwrite) or choose another path")


def _target(p: ExportParams, default: Path) -> Path:
    """The requested path (user-expanded) or the default under the data dir's exports, checked by access.py."""
    return access.writable(Path(p["path"]).expanduser() if p.get("path") else default)


def _gguf_path(out: Path, name: str) -> Path:
    """A GGUF file path: inside an existing folder <name>.gguf; anything else that exists as named (a file, a link,
    a device: _check_file decides); a new path with the extension llama.cpp's tools look for."""
    if out.is_dir() and not out.is_symlink():
        return out / f"{name}.gguf"
    return out if out.suffix.lower() == ".gguf" or os.path.lexists(out) else out.with_name(out.name + ".gguf")


def export_adapter(p: ExportParams) -> ExportResult:
    name, fmt = p["adapter"], p["format"]
    meta = adapter_meta(name)
    args = ModelArgs(**meta["args"]) if "args" in meta else ModelArgs(**meta["base"])
    adapter, _ = load_adapter(name, args)
    base = meta.get("base_model") or None
    if base == "default":  # the Hugging Face id, so that AutoPeftModelForCausalLM / mlx_lm find the base
        base = DEFAULT_MODEL_HF_ID
    out = _target(p, paths.exports_dir() / (f"{name}.gguf" if fmt == "gguf" else f"{name}-{fmt}"))
    overwrite = bool(p.get("overwrite"))
    if fmt == "gguf":
        out = access.writable(_gguf_path(out, name))
        _check_file(out, overwrite)
    else:
        _check_folder(out, fmt, overwrite)
    try:
        if fmt == "peft":
            from ..export.peft import save_peft

            d = save_peft(adapter, out, args, base)
            files = sorted(str(f) for f in Path(d).iterdir())
        elif fmt == "gguf":
            from ..export.gguf_lora import save_gguf_lora

            files = [str(save_gguf_lora(adapter, out, args, name=name))]
        else:
            from ..export.mlx import save_mlx

            d = save_mlx(adapter, out, args, base)
            files = sorted(str(f) for f in Path(d).iterdir())
    except ImportError as e:
        raise DomainError(ErrorCode.FeatureUnavailable, f"{fmt} export is not in this build ({e}); update LoRA Lab") from None
    except OSError as e:
        if is_write_fault(e):  # a full disk after the free-space check passed: the writer left nothing behind
            raise storage_error(e, out, f"exporting {name!r} as {fmt}",
                                dir_bytes(paths.adapters_dir() / name)) from None
        raise DomainError(ErrorCode.ExportFailed, f"cannot export {name!r} as {fmt} to {out}: {e}") from None
    except (LoraLabError, ValueError) as e:
        raise DomainError(ErrorCode.ExportFailed, f"cannot export {name!r} as {fmt} to {out}: {e}") from None
    return {"format": fmt, "path": str(out), "files": files}


def export_merged(p: ExportParams, model: LoadedModel, adapter: LoraAdapter) -> ExportResult:
    """The base model with the adapter merged in, as a Hugging Face directory (f16 safetensors)."""
    from ..export.merged import save_merged

    name = p["adapter"]
    out = _target(p, paths.exports_dir() / f"{name}-merged")
    _check_folder(out, "merged", bool(p.get("overwrite")))
    try:
        d = save_merged(model, [(adapter, 1.0)], out)
    except OSError as e:
        if is_write_fault(e):
            raise storage_error(e, out, f"exporting {name!r} merged") from None
        raise DomainError(ErrorCode.ExportFailed, f"cannot export {name!r} merged to {out}: {e}") from None
    except (LoraLabError, ValueError) as e:
        raise DomainError(ErrorCode.ExportFailed, f"cannot export {name!r} merged to {out}: {e}") from None
    return {"format": "merged", "path": str(out), "files": sorted(str(f) for f in Path(d).iterdir())}


def import_peft(p: ImportParams, model: LoadedModel, source: str) -> AdapterInfo:
    """A PEFT directory into the adapter store, checked against the model's shapes."""
    from ..export.peft import load_peft

    src = access.readable(p["path"], "adapter/import path")
    try:
        adapter = load_peft(src, model.args)
    except (OSError, LoraLabError, ValueError) as e:
        raise DomainError(ErrorCode.InvalidSettings, f"cannot import {p['path']}: {e}") from None
    save_adapter(p["name"], adapter, model.args, source, {"steps": 0, "importedFrom": str(p["path"])})
    info = adapter_info(p["name"])
    assert info is not None  # just saved
    return info
