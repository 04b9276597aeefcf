"""A `generate` request as a loralabd.generation Generation (iterated on the device thread)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ..engine.interface import AdapterScales, Engine, Sampling
from ..errors import LoraLabError
from ..protocol import ErrorCode, with_defaults
from ..protocol.types import GenerateParams
from .errors import DomainError

if TYPE_CHECKING:
    from ..generation import Generation
    from ..models.load import LoadedModel


def generation(engine: Engine, model: LoadedModel, p: GenerateParams, adapters: AdapterScales,
               should_stop: Callable[[], bool] | None = None) -> Generation:
    """A loralabd.generation Generation for a `generate` request (iterate it on the device thread)."""
    from ..generation import GenerationError, GenerationRequest, GenerationService

    if (p.get("messages") is None) == (p.get("prompt") is None):
        raise DomainError(ErrorCode.InvalidSettings, "give messages (a chat) or prompt (raw text), exactly one")
    q = with_defaults("GenerateParams", dict(p))
    try:
        sp = Sampling.from_protocol(p)
    except ValueError as e:
        raise DomainError(ErrorCode.InvalidSettings, str(e)) from None
    req = GenerationRequest(messages=q.get("messages"), prompt=q.get("prompt"), max_tokens=int(q["maxTokens"]),
                            temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, seed=sp.seed,
                            stop=[x for x in q["stop"] if x], adapters=adapters)
    try:
        return GenerationService(engine, model.tokenizer).stream(req, should_stop)
    except GenerationError as e:
        raise DomainError(ErrorCode.InvalidSettings, str(e)) from None
    except LoraLabError as e:  # e.g. a model without a chat template
        raise DomainError(ErrorCode.InvalidSettings, str(e)) from None
