"""Model loading: one ModelArgs for the llama family, GGUF and Hugging Face directory readers."""

from .args import ModelArgs, LINEAR_NAMES
from .load import LoadedModel, load_model, default_model_path

__all__ = ["ModelArgs", "LINEAR_NAMES", "LoadedModel", "load_model", "default_model_path"]
