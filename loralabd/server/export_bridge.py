"""adapter/export: a saved adapter through loralabd.export (PEFT, llama.cpp GGUF LoRA, MLX)."""

from __future__ import annotations

from pathlib import Path

from .. import paths
from ..errors import LoraLabError
from ..models.args import ModelArgs
from ..models.load import DEFAULT_MODEL_HF_ID
from ..protocol import ErrorCode
from ..protocol.types import ExportParams, ExportResult
from .adapters import adapter_meta, load_adapter
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
