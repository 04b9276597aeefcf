"""adapter/export and adapter/import: saved adapters through loralabd.export (PEFT, llama.cpp GGUF LoRA, MLX, a
merged model; PEFT in)."""

from __future__ import annotations

from pathlib import Path

from .. import paths
from ..engine.lora import LoraAdapter
from ..errors import LoraLabError
from ..models.args import ModelArgs
from ..models.load import DEFAULT_MODEL_HF_ID, LoadedModel
from ..protocol import ErrorCode
from ..protocol.types import AdapterInfo, ExportParams, ExportResult, ImportParams
from .adapters import adapter_info, adapter_meta, load_adapter, save_adapter
from .errors import DomainError


def export_adapter(p: ExportParams) -> ExportResult:
    name, fmt = p["adapter"], p["format"]
    meta = adapter_meta(name)
    args = ModelArgs(**meta["args"]) if "args" in meta else ModelArgs(**meta["base"])
    adapter, _ = load_adapter(name, args)
    base = meta.get("base_model") or None
    if base == "default":  # the Hugging Face id, so that AutoPeftModelForCausalLM / mlx_lm find the base
        base = DEFAULT_MODEL_HF_ID
    default = paths.exports_dir() / (f"{name}.gguf" if fmt == "gguf" else f"{name}-{fmt}")
    out = Path(p["path"]).expanduser() if p.get("path") else default
    if fmt == "gguf" and out.suffix.lower() != ".gguf" and not out.is_dir():
        out = out.with_name(out.name + ".gguf")  # llama.cpp's tools look for the extension
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
    except (OSError, LoraLabError, ValueError) as e:
        raise DomainError(ErrorCode.ExportFailed, f"cannot export {name!r} as {fmt} to {out}: {e}") from None
    return {"format": fmt, "path": str(out), "files": files}


def export_merged(p: ExportParams, model: LoadedModel, adapter: LoraAdapter) -> ExportResult:
    """The base model with the adapter merged in, as a Hugging Face directory (f16 safetensors)."""
    from ..export.merged import save_merged

    name = p["adapter"]
    out = Path(p["path"]).expanduser() if p.get("path") else paths.exports_dir() / f"{name}-merged"
    try:
        d = save_merged(model, [(adapter, 1.0)], out)
    except (OSError, LoraLabError, ValueError) as e:
        raise DomainError(ErrorCode.ExportFailed, f"cannot export {name!r} merged to {out}: {e}") from None
    return {"format": "merged", "path": str(out), "files": sorted(str(f) for f in Path(d).iterdir())}


def import_peft(p: ImportParams, model: LoadedModel, source: str) -> AdapterInfo:
    """A PEFT directory into the adapter store, checked against the model's shapes."""
    from ..export.peft import load_peft

    try:
        adapter = load_peft(Path(p["path"]).expanduser(), model.args)
    except (OSError, LoraLabError, ValueError) as e:
        raise DomainError(ErrorCode.InvalidSettings, f"cannot import {p['path']}: {e}") from None
    save_adapter(p["name"], adapter, model.args, source, {"steps": 0, "importedFrom": str(p["path"])})
    info = adapter_info(p["name"])
    assert info is not None  # just saved
    return info
