"""The model on the numpy reference ops: the CPU backend and the oracle for the WebGPU engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Sequence

import numpy as np

from ..models.load import LoadedModel
from . import reference as R
from .interface import AdapterScales, OptimSettings, Sampling
from .memory import MemoryPlan, numpy_memory_plan
from .lora import LoraAdapter
from .numpy_train import NumpyTrainSession

ATTN = ("q_proj", "k_proj", "v_proj")


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

    def __init__(self, model: LoadedModel, vocab_chunk: int = 8192):
        self.model = model
        self.args = model.args
        self.vocab_chunk = vocab_chunk
        self._dense: dict = {}  # dequantized f32 weights, built on first use
        self._out_cache: np.ndarray | None = None

    # -- weights ---------------------------------------------------------------------------------

    def W(self, i: int, name: str) -> np.ndarray:
        key = (i, name)
        if key not in self._dense:
            self._dense[key] = self.model.layers[i].linear[name].dequantize()
        return self._dense[key]

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

    # -- one projection with any adapters ----------------------------------------------------------

    def _lin(self, i, name, x, adapters, saved=None, drop_rng=None):
        L = self.model.layers[i]
        y = x @ self.W(i, name).T
        if name in L.bias:
            y = y + L.bias[name]
        for j, (ad, s) in enumerate(adapters):
            ab = ad.get(i, name)
            if ab is None or s == 0.0:
                continue
            A, Bm = ab
            mask = None
            p = ad.config.dropout
            if saved is not None and j == 0 and p > 0.0 and drop_rng is not None:
                mask = (drop_rng.random(x.shape) >= p).astype(np.float32) / (1.0 - p)
            xa = (x if mask is None else x * mask) @ A.T
            y = y + (s * ad.config.scale) * (xa @ Bm.T)
            if saved is not None and j == 0:
                saved[name] = (xa, mask)
        return y

    # -- forward ---------------------------------------------------------------------------------

    def _forward(self, tokens, adapters, positions=None, segments=None, cache=None, keep=False, drop_rng=None):
        """tokens (B, T) -> final hidden (B, T, D) and, when keep, what backward needs per layer."""
        a = self.args
        Bsz, T = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = np.broadcast_to(np.arange(start, start + T), (Bsz, T))
        cos, sin = R.rope_tables(positions, a.head_dim, a.rope_theta)  # (B, T, hd)
        Tk = start + T
        mask = R.attention_mask(T, segments, t_offset=start, t_keys=Tk)
        x = self.embed(tokens).astype(np.float32)  # (B, T, D)
        saved_layers = []
        H, KV, hd, D = a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.hidden_size
        for i, L in enumerate(self.model.layers):
            sv: dict[str, np.ndarray] | None = {} if keep else None
            if sv is not None:
                sv["x"] = x
            h, r1 = R.rmsnorm(x, L.input_layernorm, a.rms_norm_eps)
            hN = h.reshape(-1, D)
            q = self._lin(i, "q_proj", hN, adapters, sv, drop_rng).reshape(Bsz, T, H, hd)
            k = self._lin(i, "k_proj", hN, adapters, sv, drop_rng).reshape(Bsz, T, KV, hd)
            v = self._lin(i, "v_proj", hN, adapters, sv, drop_rng).reshape(Bsz, T, KV, hd)
            q = R.rope(q, cos, sin)
            k = R.rope(k, cos, sin)
            if cache is not None:
                cache.k[i][:, start:Tk] = k
                cache.v[i][:, start:Tk] = v
                k_all, v_all = cache.k[i][:, :Tk], cache.v[i][:, :Tk]
            else:
                k_all, v_all = k, v
            att, lse = R.attention(q, k_all, v_all, mask)
            attN = att.reshape(-1, H * hd)
            o = self._lin(i, "o_proj", attN, adapters, sv, drop_rng).reshape(Bsz, T, D)
            x1 = x + o
            h2, r2 = R.rmsnorm(x1, L.post_attention_layernorm, a.rms_norm_eps)
            h2N = h2.reshape(-1, D)
            g = self._lin(i, "gate_proj", h2N, adapters, sv, drop_rng)
            u = self._lin(i, "up_proj", h2N, adapters, sv, drop_rng)
            act = R.swiglu(g, u)
            d = self._lin(i, "down_proj", act, adapters, sv, drop_rng).reshape(Bsz, T, D)
            x = x1 + d
            if sv is not None:
                sv.update(r1=r1, hN=hN, q=q, k=k, v=v, lse=lse, attN=attN, x1=x1, r2=r2, h2N=h2N, g=g, u=u, act=act)
                saved_layers.append(sv)
        if cache is not None:
            cache.length = Tk
        hf, rf = R.rmsnorm(x, self.model.norm, a.rms_norm_eps)
        ctx = dict(layers=saved_layers, cos=cos, sin=sin, mask=mask, x_final=x, rf=rf)
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
        a = self.args
        tokens, labels = np.asarray(tokens), np.asarray(labels)
        Bsz, T = tokens.shape
        D, H, KV, hd = a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim
        hf, ctx = self._forward(tokens, [(adapter, 1.0)], positions, segments, keep=True, drop_rng=drop_rng)
        N = Bsz * T
        lab = labels.reshape(N)
        hfN = hf.reshape(N, D)
        loss, lse, n = R.cross_entropy(hfN, self.out_rows, a.vocab_size, lab, self.vocab_chunk)
        dh = R.cross_entropy_backward(hfN, self.out_rows, a.vocab_size, lab, lse, n, self.vocab_chunk)
        dx = R.rmsnorm_backward(dh.reshape(Bsz, T, D), ctx["x_final"], self.model.norm, ctx["rf"])
        grads: dict[str, np.ndarray] = {}
        s = adapter.config.scale
        cos, sin, mask = ctx["cos"], ctx["sin"], ctx["mask"]

        def lin_back(i, name, dy, x, sv):
            ab = adapter.get(i, name)
            if ab is None:
                return dy @ self.W(i, name)
            xa, dm = sv[name]
            dxx, dA, dB = R.lora_linear_backward(dy, x, self.W(i, name), ab[0], ab[1], s, xa, dm)
            grads[f"{i}.{name}.A"] = dA.astype(np.float32)
            grads[f"{i}.{name}.B"] = dB.astype(np.float32)
            return dxx

        for i in reversed(range(a.num_hidden_layers)):
            L, sv = self.model.layers[i], ctx["layers"][i]
            dxN = dx.reshape(N, D)
            # MLP
            dact = lin_back(i, "down_proj", dxN, sv["act"], sv)
            dg, du = R.swiglu_backward(dact, sv["g"], sv["u"])
            dh2 = lin_back(i, "gate_proj", dg, sv["h2N"], sv) + lin_back(i, "up_proj", du, sv["h2N"], sv)
            dx1 = dx + R.rmsnorm_backward(dh2.reshape(Bsz, T, D), sv["x1"], L.post_attention_layernorm, sv["r2"])
            # attention
            datt = lin_back(i, "o_proj", dx1.reshape(N, D), sv["attN"], sv).reshape(Bsz, T, H, hd)
            dq, dk, dv = R.attention_backward(datt, sv["q"], sv["k"], sv["v"], mask, sv["lse"])
            dq = R.rope_backward(dq, cos, sin).reshape(N, H * hd)
            dk = R.rope_backward(dk, cos, sin).reshape(N, KV * hd)
            dv = dv.reshape(N, KV * hd)
            dh = (lin_back(i, "q_proj", dq, sv["hN"], sv) + lin_back(i, "k_proj", dk, sv["hN"], sv)
                  + lin_back(i, "v_proj", dv, sv["hN"], sv))
            dx = dx1 + R.rmsnorm_backward(dh.reshape(Bsz, T, D), sv["x"], L.input_layernorm, sv["r1"])
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

    def memory_in_use(self) -> int:
        """Bytes of the model's tensors and of the f32 copies this engine has made of them so far."""
        dense = sum(w.nbytes for w in self._dense.values())
        return int(self.model.weight_bytes()) + dense + (0 if self._out_cache is None else self._out_cache.nbytes)

    def close(self) -> None:
        self._dense.clear()
        self._out_cache = None
