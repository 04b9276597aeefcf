"""The engine: a llama-family transformer with LoRA — forward, backward, AdamW, decoding.

`reference` holds each op in plain numpy (the test oracle for every WGSL kernel);
`numpy_engine` runs the whole model on them (the CPU backend); `webgpu` runs it in WGSL.
"""

from .lora import LoraAdapter, LoraConfig

__all__ = ["LoraAdapter", "LoraConfig"]
