"""Tokenizer (HF `tokenizers`) and chat-template rendering (the model's own Jinja template)."""

from __future__ import annotations

import json
from pathlib import Path

from typing import TYPE_CHECKING

from .errors import TokenizerError

if TYPE_CHECKING:
    from jinja2 import Template

# Pre-tokenizer regexes llama.cpp names by `tokenizer.ggml.pre` (the same ones HF tokenizer.json files hold).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class Tokenizer:
    def __init__(self, tk, *, chat_template: str | None, bos_token: str | None, eos_token: str | None,
                 add_bos: bool = False, source: str = ""):
        self.tk = tk
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.add_bos = add_bos
        self.source = source
        self.bos_id = tk.token_to_id(bos_token) if bos_token else None
        self.eos_id = tk.token_to_id(eos_token) if eos_token else None
        self._template: Template | None = None  # compiled on first use

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        ids = self.tk.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            if not ids or ids[0] != self.bos_id:
                ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        return self.tk.decode(list(ids), skip_special_tokens=skip_special)

    def token_str(self, i: int) -> str:
        return self.tk.id_to_token(i)

    # -- chat ------------------------------------------------------------------------------------

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Messages -> prompt text with the model's template (HF's Jinja environment settings)."""
        if not self.chat_template:
            raise TokenizerError(
                f"{self.source}: the model has no chat template; send a raw prompt instead of chat messages"
            )
        if self._template is None:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
            from jinja2 import TemplateError

            def raise_exception(msg):
                raise TemplateError(msg)

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
                x, indent=indent, ensure_ascii=ensure_ascii)
            env.globals["raise_exception"] = raise_exception
            self._template = env.from_string(self.chat_template)
        return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                     bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        # Templates carry their own BOS where the model wants one (HF's apply_chat_template does the same).
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=False)

    # -- constructors ----------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: Path) -> "Tokenizer":
        from tokenizers import Tokenizer as TK

        tj = path / "tokenizer.json"
        if not tj.exists():
            raise TokenizerError(
                f"{path}: tokenizer.json is missing; copy the model's tokenizer.json into the directory "
                "(LoRA Lab reads the fast-tokenizer format)"
            )
        try:
            tk = TK.from_file(str(tj))
        except Exception as e:
            raise TokenizerError(f"{tj}: not a readable tokenizer ({e})") from None
        cfg = {}
        tc = path / "tokenizer_config.json"
        if tc.exists():
            try:
                cfg = json.loads(tc.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise TokenizerError(f"{tc}: not valid JSON ({e})") from None
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take "default"
            template = next((t["template"] for t in template if t.get("name") == "default"), template[0]["template"])
        jt = path / "chat_template.jinja"
        if template is None and jt.exists():
            template = jt.read_text(encoding="utf-8")

        def tok_str(v):
            return v.get("content") if isinstance(v, dict) else v

        return cls(tk, chat_template=template, bos_token=tok_str(cfg.get("bos_token")),
                   eos_token=tok_str(cfg.get("eos_token")), add_bos=bool(cfg.get("add_bos_token", False)),
                   source=str(path))

    @classmethod
    def from_gguf_metadata(cls, meta: dict, where: str) -> "Tokenizer":
        from tokenizers import AddedToken, Tokenizer as TK, decoders, models, pre_tokenizers, Regex

        kind = meta.get("tokenizer.ggml.model")
        tokens = meta.get("tokenizer.ggml.tokens")
        if not tokens:
            raise TokenizerError(f"{where}: the GGUF has no tokenizer (tokenizer.ggml.tokens is missing)")
        if kind != "gpt2":
            raise TokenizerError(
                f"{where}: GGUF tokenizer type {kind!r} is not supported (LoRA Lab builds byte-level BPE "
                "tokenizers, type 'gpt2'); use the model's Hugging Face directory with tokenizer.json instead"
            )
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        tk = TK(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, ignore_merges=False))
        pre = meta.get("tokenizer.ggml.pre", "default")
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in ("smollm", "starcoder", "refact"):
            tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        elif pre in ("llama-bpe", "llama3", "smaug-bpe"):
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre == "qwen2":
            tk.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        elif pre in ("gpt2", "default", "gpt-2"):
            tk.pre_tokenizer = byte_level
        else:
            raise TokenizerError(f"{where}: GGUF pre-tokenizer {pre!r} is not supported; use the model's "
                                 "Hugging Face directory with tokenizer.json instead")
        tk.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        special = [AddedToken(tokens[i], special=True, normalized=False)
                   for i, t in enumerate(types) if t in (3, 4)]  # CONTROL, USER_DEFINED
        tk.add_special_tokens(special)

        def name(key):
            i = meta.get(key)
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        return cls(tk, chat_template=meta.get("tokenizer.chat_template"),
                   bos_token=name("tokenizer.ggml.bos_token_id"), eos_token=name("tokenizer.ggml.eos_token_id"),
                   add_bos=False, source=where)
