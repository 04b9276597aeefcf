"""Generation over any engine: the engine's decode iterator (engine/interface.py) turned into text.

One request: chat messages (rendered with the model's own template) or a raw prompt -> streamed text
deltas. The engine samples (greedy, temperature, top-k, top-p, seed; on the GPU for WebGPU); this module
only tokenizes, detokenizes, applies stop tokens and stop strings, and streams. Adapters are chosen per
request as [(LoraAdapter, scale), ...] and stay unmerged, so switching is free.

Concurrency: an engine decodes one request at a time (its KV cache and programs are reused across
requests); a request holds the engine's lock from its first token to its last, so requests from several
threads run one after another and each gives exactly what it gives alone.
"""

from __future__ import annotations

import math
import os
import threading
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator, Literal, Sequence

from .engine.interface import Engine, Sampling
from .engine.lora import LoraAdapter
from .errors import LoraLabError

if TYPE_CHECKING:
    from .protocol.types import FinishReason


class GenerationError(LoraLabError):
    """A request that cannot run as asked; the message says what to change."""


# End-of-turn tokens of common chat templates: generation stops on them even when the model's eos differs.
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|endoftext|>", "</s>", "<end_of_turn>")

_locks: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def engine_lock(engine) -> threading.Lock:
    """The one lock of an engine (engines hold GPU state and lazy caches; one caller at a time)."""
    with _locks_guard:
        lk = _locks.get(engine)
        if lk is None:
            lk = _locks[engine] = threading.Lock()
        return lk


@dataclass
class GenerationRequest:
    messages: list[dict] | None = None  # chat: [{"role", "content"}], rendered with the model's template
    prompt: str | None = None  # raw text (no template)
    prompt_ids: Sequence[int] | None = None  # already tokenized
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # None: a fresh one, reported in the stats
    stop: Sequence[str] = ()  # stop strings: the text ends before the first one
    stop_ids: Sequence[int] | None = None  # None: the tokenizer's eos and end-of-turn tokens
    adapters: Sequence[tuple[LoraAdapter, float]] = ()
    add_generation_prompt: bool = True

    def validate(self):
        given = [x is not None for x in (self.messages, self.prompt, self.prompt_ids)]
        if sum(given) != 1:
            raise GenerationError("give exactly one of messages (chat), prompt (raw text) or prompt_ids")
        if self.max_tokens < 1:
            raise GenerationError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise GenerationError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if any(not s for s in self.stop):
            raise GenerationError("stop strings must not be empty")
        for ad, s in self.adapters:
            if not isinstance(ad, LoraAdapter):
                raise GenerationError(f"adapters must be (LoraAdapter, scale) pairs, got {type(ad).__name__}")
            if not math.isfinite(float(s)):
                raise GenerationError(f"adapter scale must be a finite number, got {s}")


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_s: float = 0.0  # prefill: prompt in, first logits out
    decode_s: float = 0.0  # every later token
    time_to_first_token_s: float = 0.0  # request start -> first token sampled
    total_s: float = 0.0
    seed: int = 0
    finish_reason: Literal["", "stop", "length", "cancelled"] = ""  # "stop" (eos / stop token / stop string), "length", "cancelled"

    @property
    def prompt_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        # the first token comes from prefill; the decode rate counts the tokens after it
        n = self.completion_tokens - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0

    def to_dict(self) -> dict:
        return dict(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                    prompt_tokens_per_s=self.prompt_tokens_per_s, decode_tokens_per_s=self.decode_tokens_per_s,
                    time_to_first_token_s=self.time_to_first_token_s, total_s=self.total_s, seed=self.seed,
                    finish_reason=self.finish_reason)


@dataclass
class Delta:
    text: str  # new text since the last delta (may be "" while a multi-byte character is incomplete)
    token_ids: list[int]  # tokens this delta accounts for


class IncrementalDetokenizer:
    """Token ids -> text deltas that never split a UTF-8 character (byte-level BPE emits partial bytes).

    Decodes a short window of tokens before the unread ones and emits what the new ones added, as
    HF's and vLLM's streamers do; a trailing U+FFFD means the character is not complete yet, so wait.
    """

    def __init__(self, tokenizer, skip_special: bool = True):
        self.tok = tokenizer
        self.skip_special = skip_special
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # tokens already turned into text

    def _decode(self, ids):
        return self.tok.decode(ids, skip_special=self.skip_special)

    def push(self, t: int) -> str:
        self.ids.append(int(t))
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if now.endswith("\ufffd") or len(now) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """Whatever is left at the end (an incomplete character decodes as U+FFFD, as HF does)."""
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return now[len(before):] if len(now) > len(before) else ""


class Generation:
    """One running request: iterate for Delta objects; afterwards .text, .token_ids, .stats."""

    def __init__(self, engine: Engine, tokenizer, req: GenerationRequest,
                 should_stop: Callable[[], bool] | None = None):
        req.validate()
        self.engine, self.tok, self.req = engine, tokenizer, req
        self.should_stop = should_stop
        self._cancel = threading.Event()
        self.text = ""
        self.token_ids: list[int] = []
        self.stats = GenerationStats()
        self.prompt_ids = self._prompt_ids()
        self._started = False

    def cancel(self):
        """Stop before the next token (thread-safe)."""
        self._cancel.set()

    def _cancelled(self) -> bool:
        return self._cancel.is_set() or (self.should_stop is not None and bool(self.should_stop()))

    def _prompt_ids(self) -> list[int]:
        r = self.req
        if r.prompt_ids is not None:
            ids = [int(i) for i in r.prompt_ids]
        elif r.messages is not None:
            if self.tok is None:
                raise GenerationError("chat messages need the model's tokenizer; send prompt_ids instead")
            ids = self.tok.encode_chat(list(r.messages), add_generation_prompt=r.add_generation_prompt)
        else:
            if self.tok is None:
                raise GenerationError("a text prompt needs the model's tokenizer; send prompt_ids instead")
            ids = self.tok.encode(r.prompt)
        if not ids:
            raise GenerationError("the prompt is empty; send at least one token of text")
        V = self.engine.args.vocab_size
        bad = [i for i in ids if not 0 <= i < V]
        if bad:
            raise GenerationError(f"prompt token ids {bad[:5]} are outside the vocabulary (0..{V - 1})")
        ctx = self.engine.args.max_position_embeddings
        if len(ids) >= ctx:
            raise GenerationError(f"the prompt has {len(ids)} tokens but the model's context holds {ctx}; "
                                  "shorten the prompt (or drop earlier chat turns)")
        self.max_tokens = min(r.max_tokens, ctx - len(ids))  # the context ends generation, as in llama-server
        return ids

    def _stop_ids(self) -> set[int]:
        if self.req.stop_ids is not None:
            return {int(i) for i in self.req.stop_ids}
        out = set()
        if self.tok is not None:
            if self.tok.eos_id is not None:
                out.add(int(self.tok.eos_id))
            for s in END_OF_TURN:
                i = self.tok.tk.token_to_id(s)
                if i is not None:
                    out.add(int(i))
        elif self.engine.args.eos_token_id is not None:
            out.add(int(self.engine.args.eos_token_id))
        return out

    def __iter__(self) -> Iterator[Delta]:
        if self._started:
            raise GenerationError("a Generation can be iterated once; start a new request")
        self._started = True
        return self._run()

    def _run(self) -> Iterator[Delta]:
        with engine_lock(self.engine):
            yield from self._decode()

    def _decode(self) -> Iterator[Delta]:
        r, eng, st = self.req, self.engine, self.stats
        seed = r.seed if r.seed is not None else int.from_bytes(os.urandom(4), "little")
        st.seed, st.prompt_tokens = seed, len(self.prompt_ids)
        adapters = [(a, float(s)) for a, s in r.adapters if float(s) != 0.0]
        stop_ids = self._stop_ids()
        detok = IncrementalDetokenizer(self.tok) if self.tok is not None else None
        stops = list(r.stop)
        pending, pending_ids = "", []  # decoded but not yet emitted (may be the start of a stop string)
        finish: FinishReason = "length"
        cut_by_string = False
        t0 = time.perf_counter()
        t_first = t_last = t0
        if self._cancelled():
            st.finish_reason = "cancelled"
            return
        tokens = eng.decode(self.prompt_ids, self.max_tokens, Sampling(r.temperature, r.top_k, r.top_p, seed),
                            adapters)
        try:
            for n, t in enumerate(tokens):
                t_last = time.perf_counter()
                if n == 0:
                    t_first = t_last
                    st.time_to_first_token_s = st.prompt_s = t_first - t0
                self.token_ids.append(t)
                st.completion_tokens = len(self.token_ids)
                if t in stop_ids:
                    finish = "stop"
                    break
                pending_ids.append(t)
                if detok is not None:
                    pending += detok.push(t)
                    cut = _find_stop(pending, stops)
                    if cut is not None:
                        pending, finish, cut_by_string = pending[:cut], "stop", True
                        break
                    keep = _stop_prefix_len(pending, stops)
                    emit = pending[:len(pending) - keep]
                    if emit or not pending:  # report token ids even when they add no text yet
                        pending = pending[len(emit):]
                        self.text += emit
                        yield Delta(emit, pending_ids)
                        pending_ids = []
                else:
                    yield Delta("", pending_ids)
                    pending_ids = []
                if n + 1 == self.max_tokens:
                    break
                if self._cancelled():
                    finish = "cancelled"
                    break
        finally:
            tokens.close()  # a GPU engine lets the batch in flight land
        st.decode_s = t_last - t_first
        st.total_s = time.perf_counter() - t0
        if detok is not None and not cut_by_string:
            pending += detok.flush()  # an incomplete character at the end shows as U+FFFD, as in HF
            cut = _find_stop(pending, stops)
            if cut is not None:
                pending, finish = pending[:cut], "stop"
        st.finish_reason = finish
        if pending or pending_ids:
            self.text += pending
            yield Delta(pending, pending_ids)


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string (held back)."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


def _find_stop(text: str, stops: list[str]) -> int | None:
    """Index where the earliest stop string starts, or None."""
    best = None
    for s in stops:
        i = text.find(s)
        if i >= 0 and (best is None or i < best):
            best = i
    return best


class GenerationService:
    """Generation on one engine (any backend): streaming or whole, one request per call, thread-safe."""

    def __init__(self, engine: Engine, tokenizer=None):
        self.engine = engine
        self.tokenizer = tokenizer if tokenizer is not None else engine.model.tokenizer

    def stream(self, req: GenerationRequest | None = None, should_stop: Callable[[], bool] | None = None,
               **kw) -> Generation:
        """A Generation to iterate; `should_stop` is polled between tokens (cancellation)."""
        return Generation(self.engine, self.tokenizer, req if req is not None else GenerationRequest(**kw),
                          should_stop)

    def generate(self, req: GenerationRequest | None = None, should_stop=None, **kw) -> Generation:
        """Run to the end and return the finished Generation (.text, .token_ids, .stats)."""
        g = self.stream(req, should_stop, **kw)
        for _ in g:
            pass
        return g
