"""One `ModelArgs` for every llama-family architecture, built from HF config.json or GGUF metadata."""

from __future__ import annotations

from dataclasses import dataclass, asdict

from ..errors import UnsupportedModelError

# The 7 linear projections of a llama block, in HF naming; LoRA targets use these names.
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Architectures we run: HF `model_type` / GGUF `general.architecture` -> canonical family.
# They share one graph; qwen2 differs only by q/k/v biases.
ARCH_ALIASES = {
    "llama": "llama",
    "LlamaForCausalLM": "llama",
    "mistral": "llama",
    "MistralForCausalLM": "llama",
    "qwen2": "qwen2",
    "Qwen2ForCausalLM": "qwen2",
}


@dataclass(frozen=True)
class ModelArgs:
    arch: str  # as named by the source ("llama", "mistral", "qwen2")
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    head_dim: int = 0
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2: q/k/v carry biases
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self):
        if not self.head_dim:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise UnsupportedModelError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @property
    def family(self) -> str:
        return ARCH_ALIASES[self.arch]

    def linear_shape(self, name: str) -> tuple[int, int]:
        """(out_features, in_features) of a projection."""
        d, f, hd = self.hidden_size, self.intermediate_size, self.head_dim
        return {
            "q_proj": (self.num_attention_heads * hd, d),
            "k_proj": (self.num_key_value_heads * hd, d),
            "v_proj": (self.num_key_value_heads * hd, d),
            "o_proj": (d, self.num_attention_heads * hd),
            "gate_proj": (f, d),
            "up_proj": (f, d),
            "down_proj": (d, f),
        }[name]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_hf_config(cls, cfg: dict, where: str = "config.json") -> "ModelArgs":
        arch = cfg.get("model_type") or (cfg.get("architectures") or [None])[0]
        if arch not in ARCH_ALIASES:
            raise UnsupportedModelError(
                f"{where}: architecture {arch!r} is not supported; LoRA Lab runs "
                f"{sorted({k for k in ARCH_ALIASES if k.islower()})}"
            )
        try:
            eos = cfg.get("eos_token_id")
            if isinstance(eos, list):
                eos = eos[0]
            return cls(
                arch=arch,
                hidden_size=int(cfg["hidden_size"]),
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=int(cfg["num_attention_heads"]),
                num_key_value_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
                vocab_size=int(cfg["vocab_size"]),
                head_dim=int(cfg.get("head_dim") or 0),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", ARCH_ALIASES[arch] == "qwen2")),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=eos,
            )
        except KeyError as e:
            raise UnsupportedModelError(f"{where}: required field {e.args[0]!r} is missing") from None

    @classmethod
    def from_gguf_metadata(cls, meta: dict, where: str, has_output: bool, has_qkv_bias: bool) -> "ModelArgs":
        arch = meta.get("general.architecture")
        if arch not in ARCH_ALIASES:
            raise UnsupportedModelError(
                f"{where}: GGUF architecture {arch!r} is not supported; LoRA Lab runs llama, mistral, qwen2"
            )

        def get(key, default=None):
            v = meta.get(f"{arch}.{key}", default)
            if v is None:
                raise UnsupportedModelError(f"{where}: GGUF metadata {arch}.{key} is missing")
            return v

        n_head = int(get("attention.head_count"))
        d = int(get("embedding_length"))
        return cls(
            arch=arch,
            hidden_size=d,
            intermediate_size=int(get("feed_forward_length")),
            num_hidden_layers=int(get("block_count")),
            num_attention_heads=n_head,
            num_key_value_heads=int(get("attention.head_count_kv", n_head)),
            vocab_size=int(meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))),
            head_dim=int(meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count") or d // n_head),
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_position_embeddings=int(get("context_length", 4096)),
            tie_word_embeddings=not has_output,
            attention_bias=has_qkv_bias,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        )
