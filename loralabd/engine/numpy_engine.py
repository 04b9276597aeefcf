"""The model on numpy: the CPU backend (its kernels in cpu_ops.py and cpu_layer.py, held to reference.py) and the
oracle for the WebGPU engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Sequence

import numpy as np

from ..models.load import LoadedModel
from . import cpu_ops as C
from . import reference as R
from .cpu_layer import DOWN, GU, O, QKV, layer_backward, layer_forward
from .interface import AdapterScales, OptimSettings, Sampling
from .memory import MemoryPlan, numpy_memory_plan
from .lora import LoraAdapter
from .numpy_train import NumpyTrainSession


@dataclass
class KVCache:
    k: list  # per layer (B, max_T, KV, hd)
    v: list
    length: int = 0

    @classmethod
    def empty(cls, args, batch, max_len):
        shape = (batch, max_len, args.num_key_value_heads, args.head_dim)
        n = args.num_hidden_layers
        return cls([np.zeros(shape, np.float32) for _ in range(n)], [np.zeros(shape, np.float32) for _ in range(n)])


class NumpyEngine:
    """Forward, backward and decoding of a llama-family model with any number of LoRA adapters."""

    backend = "numpy"
    attention_block = 0  # its attention blocks are shared by every row: packed rows' unseen keys are computed

    def __init__(self, model: LoadedModel, vocab_chunk: int = 8192):
        self.model = model
        self.args = model.args
        self.vocab_chunk = vocab_chunk
        self._dense: dict = {}  # (layer, group) -> (W (sum of outs, in) f32, bias or None, name -> rows), on first use
        self._out_cache: np.ndarray | None = None

    # -- weights ---------------------------------------------------------------------------------

    def group(self, i: int, names: tuple) -> tuple:
        """The projections `names` of layer i dequantized once and stacked: W (sum of outs, in), the stacked bias
        (None without biases), and each name's rows."""
        key = (i, names)
        if key not in self._dense:
            L = self.model.layers[i]
            ws = [L.linear[n].dequantize() for n in names]
            W = ws[0] if len(ws) == 1 else np.concatenate(ws)
            del ws
            rows, r0 = {}, 0
            for n in names:
                out_f = self.args.linear_shape(n)[0]
                rows[n] = (r0, r0 + out_f)
                r0 += out_f
            bias = None
            if any(n in L.bias for n in names):
                bias = np.concatenate([np.asarray(L.bias[n], np.float32) if n in L.bias
                                       else np.zeros(rows[n][1] - rows[n][0], np.float32) for n in names])
            self._dense[key] = (np.ascontiguousarray(W, np.float32), bias, rows)
        return self._dense[key]

    def W(self, i: int, name: str) -> np.ndarray:
        """(out, in) f32 weight of one projection (a view of its group's stacked matrix)."""
        g = next(g for g in (QKV, O, GU, DOWN) if name in g)
        W, _, rows = self.group(i, g)
        return W[rows[name][0]:rows[name][1]]

    def out_rows(self, start: int, stop: int) -> np.ndarray:
        if self._out_cache is None:
            self._out_cache = self.model.output.dequantize()  # (V, D)
        return self._out_cache[start:stop]

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        if self.model.lm_head is None and self._out_cache is not None:
            return self._out_cache[tokens]
        flat = tokens.reshape(-1)
        uniq, inv = np.unique(flat, return_inverse=True)
        rows = np.stack([self.model.embed_tokens.rows(int(t), int(t) + 1)[0] for t in uniq])
        return rows[inv].reshape(*tokens.shape, -1)

    # -- forward ---------------------------------------------------------------------------------

    def _forward(self, tokens, adapters, positions=None, segments=None, cache=None, keep=False, drop_rng=None):
        """tokens (B, T) -> final hidden (B, T, D) and, when keep, what backward needs per layer."""
        with C.own_threads(int(np.size(tokens))):
            return self._forward_layers(tokens, adapters, positions, segments, cache, keep, drop_rng)

    def _forward_layers(self, tokens, adapters, positions, segments, cache, keep, drop_rng):
        a = self.args
        Bsz, T = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = np.broadcast_to(np.arange(start, start + T), (Bsz, T))
        cos, sin = R.rope_tables(positions, a.head_dim, a.rope_theta)  # (B, T, hd)
        cos, sin = (np.ascontiguousarray(np.broadcast_to(t, (Bsz, T, a.head_dim))) for t in (cos, sin))
        blocks = C.attention_blocks(T, start + T, start, segments, a.num_attention_heads // a.num_key_value_heads)
        x = self.embed(tokens).astype(np.float32)  # (B, T, D)
        saved_layers = []
        for i in range(a.num_hidden_layers):
            x, sv = layer_forward(self, i, x, adapters, cos, sin, blocks, cache, start, keep, drop_rng)
            saved_layers.append(sv)
        if cache is not None:
            cache.length = start + T
        hf, rf = R.rmsnorm(x, self.model.norm, a.rms_norm_eps)
        ctx = dict(layers=saved_layers, cos=cos, sin=sin, blocks=blocks, x_final=x, rf=rf)
        return hf, ctx

    def logits(self, tokens, adapters=()) -> np.ndarray:
        """(B, T, V) logits — for tests and small inputs only."""
        hf, _ = self._forward(np.asarray(tokens), list(adapters))
        return hf @ self.out_rows(0, self.args.vocab_size).T

    def loss(self, tokens, labels, adapters=(), segments=None, positions=None) -> float:
        hf, _ = self._forward(np.asarray(tokens), list(adapters), positions, segments)
        N = hf.shape[0] * hf.shape[1]
        loss, _, _ = R.cross_entropy(hf.reshape(N, -1), self.out_rows, self.args.vocab_size,
                                     np.asarray(labels).reshape(N), self.vocab_chunk)
        return loss

    # -- training --------------------------------------------------------------------------------

    def loss_and_grads(self, tokens, labels, adapter: LoraAdapter, segments=None, positions=None, drop_rng=None):
        """Mean loss over labelled positions and d(loss)/d(A, B) for every adapter matrix."""
        with C.own_threads():
            return self._loss_and_grads(tokens, labels, adapter, segments, positions, drop_rng)

    def _loss_and_grads(self, tokens, labels, adapter, segments, positions, drop_rng):
        a = self.args
        tokens, labels = np.asarray(tokens), np.asarray(labels)
        Bsz, T = tokens.shape
        D, N = a.hidden_size, Bsz * T
        hf, ctx = self._forward(tokens, [(adapter, 1.0)], positions, segments, keep=True, drop_rng=drop_rng)
        loss, dh, n = C.cross_entropy_grad(hf.reshape(N, D), self.out_rows(0, a.vocab_size), labels.reshape(N),
                                           self.vocab_chunk)
        dx = C.rmsnorm_backward(dh, ctx["x_final"].reshape(N, D), self.model.norm, ctx["rf"].reshape(N, 1))
        grads: dict[str, np.ndarray] = {}
        for i in reversed(range(a.num_hidden_layers)):
            # the embeddings are frozen: below layer 0 only the LoRA gradients are wanted
            dx = layer_backward(self, i, ctx["layers"][i], dx, adapter, ctx["cos"], ctx["sin"], ctx["blocks"], grads,
                                need_dx=i > 0)
        return loss, grads, n

    def train_session(self, adapter: LoraAdapter, optim: OptimSettings = OptimSettings()) -> NumpyTrainSession:
        return NumpyTrainSession(self, adapter, optim)

    # -- decoding --------------------------------------------------------------------------------

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return KVCache.empty(self.args, batch, max_len)

    def step_logits(self, tokens, cache: KVCache, adapters=()) -> np.ndarray:
        """Feed tokens (B, T) after what the cache holds; logits of the last position (B, V)."""
        hf, _ = self._forward(np.asarray(tokens), list(adapters), cache=cache)
        return hf[:, -1] @ self.out_rows(0, self.args.vocab_size).T

    def decode(self, prompt_ids: Sequence[int], max_tokens: int, sampling: Sampling = Sampling(),
               adapters: AdapterScales = ()) -> Generator[int, None, None]:
        """Token ids after the prompt (batch 1); sampling is reference.sample_token, the GPU sampler's oracle,
        so a seed gives the same tokens on both engines (up to float rounding of the logits)."""
        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty; give at least one token")
        max_tokens = int(min(max_tokens, self.args.max_position_embeddings - len(prompt)))
        adapters = [(a, float(s)) for a, s in adapters if float(s) != 0.0]
        return self._decode(prompt, max_tokens, sampling, adapters)

    def _decode(self, prompt, max_tokens, sp: Sampling, adapters) -> Generator[int, None, None]:
        cache = self.new_cache(1, len(prompt) + max_tokens)
        logits = self.step_logits(np.asarray([prompt]), cache, adapters)[0]
        for n in range(max_tokens):
            t = R.sample_token(logits, sp.temperature, sp.top_k, sp.top_p, sp.seed, n)
            yield t
            if n + 1 < max_tokens:
                logits = self.step_logits(np.asarray([[t]]), cache, adapters)[0]

    def memory_plan(self, batch: int, seq: int, lora_config, optim: str = "adamw",
                    recompute: bool = False) -> MemoryPlan:
        """This engine's arrays for a training step of (batch, seq) (engine/memory.py); the first-loss phase only
        while the output matrix is still to be dequantized. It always keeps its activations (recompute unused)."""
        return numpy_memory_plan(self.model, lora_config, batch, seq, optim, self.vocab_chunk,
                                 first_step=self._out_cache is None)

    def forget_compiled(self) -> None:
        """Nothing is compiled on the CPU."""

    def memory_in_use(self) -> int:
        """Bytes of the model's tensors and of the f32 copies this engine has made of them so far."""
        dense = sum(w.nbytes + (0 if b is None else b.nbytes) for w, b, _ in self._dense.values())
        return int(self.model.weight_bytes()) + dense + (0 if self._out_cache is None else self._out_cache.nbytes)

    def close(self) -> None:
        self._dense.clear()
        self._out_cache = None
