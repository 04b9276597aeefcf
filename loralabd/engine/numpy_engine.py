"""The model on the numpy reference ops: the CPU backend and the oracle for the WebGPU engine."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generator, Sequence

import numpy as np

from ..models.load import LoadedModel
from . import cpu_ops as C
from . import reference as R
from .interface import AdapterScales, OptimSettings, Sampling
from .memory import MemoryPlan, numpy_memory_plan
from .lora import LoraAdapter
from .numpy_train import NumpyTrainSession

# projections that read the same input, multiplied as one matrix (their weights stacked by rows)
QKV, O, GU, DOWN = ("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)


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
        self._dense: dict = {}  # (layer, group) -> (W (sum of outs, in) f32, bias or None, name -> rows), built on first use
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

    # -- projections with any adapters ----------------------------------------------------------

    def _proj(self, i, names, x, adapters, saved=None, drop_rng=None):
        """x (N, in) -> (N, sum of outs): the projections `names` (one matmul) plus each adapter's LoRA term;
        saved (training) gets each name's (x·Aᵀ, dropout mask) of the first adapter."""
        W, bias, rows = self.group(i, names)
        y = C.mm(x, W.T)
        if bias is not None:
            y += bias
        for j, (ad, s) in enumerate(adapters):
            if s == 0.0:
                continue
            c = np.float32(s * ad.config.scale)
            here = [n for n in names if ad.get(i, n) is not None]
            if not here:
                continue
            p = ad.config.dropout
            if saved is not None and j == 0 and p > 0.0 and drop_rng is not None:
                xas = []
                for name in here:  # one mask per projection, drawn in order
                    mask = (drop_rng.random(x.shape) >= p).astype(np.float32) / (1.0 - p)
                    xas.append((x * mask) @ ad.get(i, name)[0].T)
                    saved[name] = (xas[-1], mask)
            else:  # x·Aᵀ of the group's projections in one pass over x
                A = ad.get(i, here[0])[0] if len(here) == 1 else np.concatenate([ad.get(i, n)[0] for n in here])
                xa_all = x @ A.T  # (N, r * len(here))
                r = ad.config.r
                xas = [np.ascontiguousarray(xa_all[:, k * r:(k + 1) * r]) for k in range(len(here))]
                if saved is not None and j == 0:
                    saved.update({n: (xa, None) for n, xa in zip(here, xas)})
            for name, xa in zip(here, xas):
                r0, r1 = rows[name]
                y[:, r0:r1] += (xa * c) @ ad.get(i, name)[1].T
        return y

    def _proj_back(self, i, names, dy, x, saved, adapter, grads, need_dx=True):
        """dy (N, sum of outs) -> dx (N, in) (None when not needed); d(A, B) of the adapter's matrices into grads,
        as reference.lora_linear_backward."""
        W, _, rows = self.group(i, names)
        dx = C.mm(dy, W) if need_dx else None
        s = adapter.config.scale
        here = [n for n in names if adapter.get(i, n) is not None]
        dxas = []
        for name in here:
            Bm = adapter.get(i, name)[1]
            xa = saved[name][0]
            r0, r1 = rows[name]
            dyj = dy[:, r0:r1]  # (N, out): a strided view, BLAS takes it as is
            grads[f"{i}.{name}.B"] = s * (dyj.T @ xa)
            dxas.append(s * (dyj @ Bm))  # (N, r)
        if not here:
            return dx
        if all(saved[n][1] is None for n in here):  # no dropout: the group's dA and dx in one matmul each
            dxa = dxas[0] if len(here) == 1 else np.concatenate(dxas, axis=1)  # (N, r * len(here))
            dA = dxa.T @ x
            r = adapter.config.r
            for k, name in enumerate(here):
                grads[f"{i}.{name}.A"] = dA[k * r:(k + 1) * r]
            if dx is not None:
                A = adapter.get(i, here[0])[0] if len(here) == 1 else np.concatenate([adapter.get(i, n)[0] for n in here])
                dx += dxa @ A
            return dx
        for name, dxa in zip(here, dxas):
            dm = saved[name][1]
            grads[f"{i}.{name}.A"] = dxa.T @ (x * dm)
            if dx is not None:
                dxd = dxa @ adapter.get(i, name)[0]
                dxd *= dm
                dx += dxd
        return dx

    # -- forward ---------------------------------------------------------------------------------

    def _forward(self, tokens, adapters, positions=None, segments=None, cache=None, keep=False, drop_rng=None):
        """tokens (B, T) -> final hidden (B, T, D) and, when keep, what backward needs per layer."""
        with C.own_threads():
            return self._forward_layers(tokens, adapters, positions, segments, cache, keep, drop_rng)

    def _forward_layers(self, tokens, adapters, positions, segments, cache, keep, drop_rng):
        a = self.args
        Bsz, T = tokens.shape
        start = cache.length if cache is not None else 0
        if positions is None:
            positions = np.broadcast_to(np.arange(start, start + T), (Bsz, T))
        cos, sin = R.rope_tables(positions, a.head_dim, a.rope_theta)  # (B, T, hd)
        Tk = start + T
        H, KV, hd, D, F = a.num_attention_heads, a.num_key_value_heads, a.head_dim, a.hidden_size, a.intermediate_size
        blocks = C.attention_blocks(T, Tk, start, segments, H // KV)
        x = self.embed(tokens).astype(np.float32)  # (B, T, D)
        saved_layers = []
        for i, L in enumerate(self.model.layers):
            sv: dict[str, np.ndarray] | None = {} if keep else None
            if sv is not None:
                sv["x"] = x
            h, r1 = R.rmsnorm(x, L.input_layernorm, a.rms_norm_eps)
            hN = h.reshape(-1, D)
            qkv = self._proj(i, QKV, hN, adapters, sv, drop_rng)  # (N, (H + 2 KV) hd)
            q = C.rope(qkv[:, :H * hd].reshape(Bsz, T, H, hd), cos, sin)
            k = C.rope(qkv[:, H * hd:(H + KV) * hd].reshape(Bsz, T, KV, hd), cos, sin)
            v = np.ascontiguousarray(qkv[:, (H + KV) * hd:]).reshape(Bsz, T, KV, hd)
            del qkv
            if cache is not None:
                cache.k[i][:, start:Tk] = k
                cache.v[i][:, start:Tk] = v
                k_all, v_all = cache.k[i][:, :Tk], cache.v[i][:, :Tk]
            else:
                k_all, v_all = k, v
            att, lse = C.attention(q, k_all, v_all, blocks)
            attN = att.reshape(-1, H * hd)
            o = self._proj(i, O, attN, adapters, sv, drop_rng).reshape(Bsz, T, D)
            x1 = x + o
            h2, r2 = R.rmsnorm(x1, L.post_attention_layernorm, a.rms_norm_eps)
            h2N = h2.reshape(-1, D)
            gu = self._proj(i, GU, h2N, adapters, sv, drop_rng)  # (N, 2F)
            g, u = gu[:, :F], gu[:, F:]
            act = C.swiglu(g, u)
            d = self._proj(i, DOWN, act, adapters, sv, drop_rng).reshape(Bsz, T, D)
            x = x1 + d
            if sv is not None:
                sv.update(r1=r1, hN=hN, q=q, k=k, v=v, lse=lse, attN=attN, x1=x1, r2=r2, h2N=h2N, g=g, u=u, act=act)
                saved_layers.append(sv)
        if cache is not None:
            cache.length = Tk
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
        D, H, KV, hd = a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim
        hf, ctx = self._forward(tokens, [(adapter, 1.0)], positions, segments, keep=True, drop_rng=drop_rng)
        N = Bsz * T
        lab = labels.reshape(N)
        hfN = hf.reshape(N, D)
        loss, dh, n = C.cross_entropy_grad(hfN, self.out_rows(0, a.vocab_size), lab, self.vocab_chunk)
        dx = R.rmsnorm_backward(dh.reshape(Bsz, T, D), ctx["x_final"], self.model.norm, ctx["rf"])
        grads: dict[str, np.ndarray] = {}
        cos, sin, blocks = ctx["cos"], ctx["sin"], ctx["blocks"]
        F, Hd, KVd = a.intermediate_size, H * hd, KV * hd
        for i in reversed(range(a.num_hidden_layers)):
            L, sv = self.model.layers[i], ctx["layers"][i]
            # MLP
            dact = self._proj_back(i, DOWN, dx.reshape(N, D), sv["act"], sv, adapter, grads)
            dgu = np.empty((N, 2 * F), np.float32)
            C.swiglu_backward(dact, sv["g"], sv["u"], dgu)
            del dact
            dh2 = self._proj_back(i, GU, dgu, sv["h2N"], sv, adapter, grads)
            del dgu
            dx1 = dx + R.rmsnorm_backward(dh2.reshape(Bsz, T, D), sv["x1"], L.post_attention_layernorm, sv["r2"])
            # attention
            datt = self._proj_back(i, O, dx1.reshape(N, D), sv["attN"], sv, adapter, grads).reshape(Bsz, T, H, hd)
            dq, dk, dv = C.attention_backward(datt, sv["attN"].reshape(Bsz, T, H, hd), sv["q"], sv["k"], sv["v"],
                                              sv["lse"], blocks)
            dqkv = np.empty((N, Hd + 2 * KVd), np.float32)
            C.rope_backward(dq, cos, sin, out=dqkv[:, :Hd].reshape(Bsz, T, H, hd))
            C.rope_backward(dk, cos, sin, out=dqkv[:, Hd:Hd + KVd].reshape(Bsz, T, KV, hd))
            dqkv[:, Hd + KVd:] = dv.reshape(N, KVd)
            del dq, dk, dv
            # the embeddings are frozen: below layer 0 only the LoRA gradients are wanted
            dh = self._proj_back(i, QKV, dqkv, sv["hN"], sv, adapter, grads, need_dx=i > 0)
            if i > 0:
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
        out = self.out_rows(0, self.args.vocab_size)
        with C.own_threads():
            return C.mm(np.ascontiguousarray(hf[:, -1]), out.T)

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
        dense = sum(w.nbytes + (0 if b is None else b.nbytes) for w, b, _ in self._dense.values())
        return int(self.model.weight_bytes()) + dense + (0 if self._out_cache is None else self._out_cache.nbytes)

    def close(self) -> None:
        self._dense.clear()
        self._out_cache = None
