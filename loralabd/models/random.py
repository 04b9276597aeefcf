"""Random-weight models of any llama shape: tests, and benchmarks where the real weights don't travel."""

from __future__ import annotations

from typing import Any

import numpy as np

from .args import LINEAR_NAMES, ModelArgs
from .load import LayerWeights, LoadedModel
from .quant import dense, quantize_q4_1, quantize_q8_0


def smollm2_135m_args() -> ModelArgs:
    """The default model's shape."""
    return ModelArgs(arch="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                     num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, head_dim=64,
                     rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192,
                     tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def tiny_args(**kw) -> ModelArgs:
    base: dict[str, Any] = dict(arch="llama", hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=300, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_position_embeddings=512, tie_word_embeddings=True)
    base.update(kw)
    return ModelArgs(**base)


def random_model(args: ModelArgs, seed: int = 0, quantized: bool = True, tokenizer=None) -> LoadedModel:
    """Weights ~ N(0, 0.02) (norms ~ 1 + N(0, 0.1)); linear weights q4_1 and embeddings q8_0 when quantized."""
    rng = np.random.default_rng(seed)

    def w(shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    def lin(x):
        return quantize_q4_1(x) if quantized and x.shape[1] % 32 == 0 else dense(x)

    def norm():
        return (1.0 + 0.1 * rng.standard_normal(args.hidden_size)).astype(np.float32)

    layers = []
    for _ in range(args.num_hidden_layers):
        linear = {n: lin(w(args.linear_shape(n))) for n in LINEAR_NAMES}
        bias = {n: w((args.linear_shape(n)[0],)) for n in ("q_proj", "k_proj", "v_proj")} if args.attention_bias else {}
        layers.append(LayerWeights(norm(), norm(), linear, bias))
    emb = w((args.vocab_size, args.hidden_size))
    embq = quantize_q8_0(emb) if quantized and args.hidden_size % 32 == 0 else dense(emb)
    head = None
    if not args.tie_word_embeddings:
        hw = w((args.vocab_size, args.hidden_size))
        head = quantize_q8_0(hw) if quantized and args.hidden_size % 32 == 0 else dense(hw)
    return LoadedModel(args=args, embed_tokens=embq, lm_head=head, norm=norm(), layers=layers,
                       tokenizer=tokenizer, source=f"random:{seed}", name="random",
                       metadata={"format": "random"})


def load_spec(spec: str | None) -> LoadedModel:
    """A model by name, for the planner's measurements and calibration subprocesses: "default" (the shipped
    GGUF), "random-smollm2" (its shape, random weights; "random-smollm2:4" with 4 layers), or a path."""
    from .load import load_model

    if spec in (None, "", "default"):
        return load_model(None)
    if spec.startswith("random-smollm2"):
        args = smollm2_135m_args()
        if ":" in spec:
            args = type(args)(**{**args.to_dict(), "num_hidden_layers": int(spec.split(":")[1])})
        return random_model(args, seed=0)
    return load_model(spec)
