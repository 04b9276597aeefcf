"""LoRA Lab: LoRA fine-tuning of small language models through WebGPU."""

__version__ = "0.1.0"
