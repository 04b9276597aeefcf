"""WebGPUEngine: the engine interface (engine/interface.py) in WGSL.

Decoding runs from a per-model arena: one KV cache, the prompt and id buffers, and recorded programs,
all reused across requests. A prompt goes in as fixed-size chunks (one program for any prompt length);
each decoded token is one recorded program whose last kernels sample on the GPU and advance the
position, so the next token's program needs nothing from the host. Tokens go out in small batches per
submit, and the ids of batch n are read while batch n+1 runs. Adapter weights are uploaded once per
(adapter, version).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Generator, Iterator, Sequence

import numpy as np

from ...models.load import LoadedModel
from .. import reference as R
from ..interface import AdapterScales, OptimSettings, Sampling
from ..lora import LoraAdapter
from . import kernels as K
from .graph import GROUPS, Acts, ModelGraph, Program
from .runtime import Copy, WebGPUError, get_runtime
from ..memory import MemoryPlan
from .sizing import memory_plan, plan_buffers
from .train import WebGPUTrainSession

RING = 256  # sampled ids kept on the GPU (two batches in flight must fit)
MAX_BATCH = 16  # decoded tokens per submit, reached by doubling from 1 (the first tokens stream at once)


class AdapterSlot:
    """One adapter's A/B matrices on the GPU for inference: per projection (256-byte aligned views), and per
    fused group (A of q/k/v stacked (3r, D), B stacked (Hq+2Hk, r); zeros for projections it does not target)."""

    def __init__(self, rt, args, adapter: LoraAdapter):
        self.rt, self.args = rt, args
        self.keys = list(adapter.A.keys())
        self.r, self.scale = adapter.config.r, adapter.config.scale
        self.version: int | None = None
        self.layout, off = {}, 0
        for k in self.keys:
            for part, arr in (("A", adapter.A[k]), ("B", adapter.B[k])):
                self.layout[(k, part)] = (off, arr.size)
                off += -(-arr.size // 64) * 64
        layers = sorted({int(k.split(".")[0]) for k in self.keys})
        for i in layers:
            for g, names in GROUPS.items():
                if not any(f"{i}.{n}" in adapter.A for n in names):
                    continue
                na = len(names) * self.r * args.linear_shape(names[0])[1]
                nb = sum(args.linear_shape(n)[0] for n in names) * self.r
                self.layout[(f"{i}.{g}", "A")] = (off, na)
                off += -(-na // 64) * 64
                self.layout[(f"{i}.{g}", "B")] = (off, nb)
                off += -(-nb // 64) * 64
        self.buf = rt.buffer(4 * max(off, 64), "adapter")

    def write(self, adapter: LoraAdapter):
        """Upload the adapter's weights when its version differs from the one on the GPU."""
        if self.version == adapter.version:
            return
        flat = np.zeros(self.buf.n, np.float32)
        for (k, part), (off, n) in self.layout.items():
            i, name = k.split(".", 1)
            if name in GROUPS:
                src = [(adapter.A if part == "A" else adapter.B).get(f"{i}.{m}") for m in GROUPS[name]]
                o = off
                for m, arr in zip(GROUPS[name], src):
                    size = self.r * self.args.linear_shape(m)[1 if part == "A" else 0]
                    if arr is not None:
                        flat[o:o + size] = arr.reshape(-1)
                    o += size
            else:
                flat[off:off + n] = (adapter.A if part == "A" else adapter.B)[k].reshape(-1)
        self.rt.write(self.buf, flat)
        self.version = adapter.version


class SlotLora:
    """An adapter slot as the graph reads LoRA: (i, name) -> (A view, B view, r, scale) | None, and the
    same per fused group."""

    has_fused = True

    def __init__(self, slot: AdapterSlot, s: float):
        rt = slot.rt
        self.views = {k: (rt.view(slot.buf, 4 * slot.layout[(k, "A")][0], 4 * slot.layout[(k, "A")][1]),
                          rt.view(slot.buf, 4 * slot.layout[(k, "B")][0], 4 * slot.layout[(k, "B")][1]))
                      for k, part in slot.layout if part == "A"}
        self.r, self.s = slot.r, s

    def __call__(self, i, name):
        v = self.views.get(f"{i}.{name}")
        return None if v is None else (v[0], v[1], self.r, self.s)

    def fused(self, i, group):
        return self(i, group)


class DecodeArena:
    """Batch-1 decoding state of one model, reused by every request: KV cache (cap tokens), the prompt,
    the sampler's words, the ring of sampled ids and, per adapter set, a prefill-chunk and a token program."""

    def __init__(self, g: ModelGraph, cap: int, chunk: int):
        rt, a = g.rt, g.args
        self.rt, self.cap, self.chunk = rt, cap, chunk
        w = a.num_key_value_heads * a.head_dim
        self.B, self.max_len, self.length = 1, cap, 0
        self.k = [rt.buffer(4 * cap * w, f"kcache{i}") for i in range(a.num_hidden_layers)]
        self.v = [rt.buffer(4 * cap * w, f"vcache{i}") for i in range(a.num_hidden_layers)]
        self.dyn = rt.buffer(16, "dyn", np.zeros(4, np.uint32))  # [position of the next token fed, ...]
        self.dyn_last = rt.buffer(16, "dyn.last", np.zeros(4, np.uint32))  # [prompt length - 1]: before the head
        n_chunks = cap // chunk
        self.chunk_dyn = rt.buffer(16 * n_chunks, "dyn.chunks",
                                   np.stack([np.arange(n_chunks, dtype=np.uint32) * chunk] + [np.zeros(n_chunks, np.uint32)] * 3, 1))
        self.positions = rt.buffer(4 * cap, "positions", np.arange(cap, dtype=np.int32))
        self.prompt = rt.buffer(4 * cap, "prompt")
        self.samp = rt.buffer(32, "sampler")
        self.ids = rt.buffer(4 * RING, "ids")
        self.programs: OrderedDict = OrderedDict()  # adapter key -> (prefill chunk Program, token Program)

    def free(self):
        for prog in self.programs.values():
            for p in prog:
                p.acts.free()
        self.programs.clear()
        for b in self.k + self.v + [self.dyn, self.dyn_last, self.chunk_dyn, self.positions, self.prompt, self.samp,
                                    self.ids]:
            self.rt.free(b)


class WebGPUEngine:
    """The engine interface on WebGPU: decode, logits, loss, train sessions."""

    backend = "webgpu"

    def __init__(self, model: LoadedModel, vocab_chunk: int | None = None, max_programs: int = 8,
                 ce_row_chunk: int | None = None, runtime=None):
        self.rt = runtime if runtime is not None else get_runtime()
        self.model, self.args = model, model.args
        self.graph = ModelGraph(self.rt, model, vocab_chunk, ce_row_chunk)
        self.rt.flush_writes()  # the last chunk's staging copies go back now, not at the first step
        self._programs: OrderedDict = OrderedDict()  # logits / loss programs per (shape, adapters)
        self._max_programs = max_programs
        self._slots: OrderedDict = OrderedDict()  # adapter uid -> AdapterSlot
        self._max_slots = 4
        self._arena: DecodeArena | None = None
        self.prefill_chunk = int(os.environ.get("LORALAB_PREFILL_CHUNK", 128 if self.rt.tiled else 32))

    @property
    def attention_block(self) -> int:
        """Queries (and keys) of a block of the blocked attention, which skips packed rows' block pairs that see
        nothing of each other (attention_flash.wgsl); 0 on the one-query-an-invocation kernel (lavapipe)."""
        return K.attention_block(self.rt, self.args.head_dim)

    # -- adapters for inference -------------------------------------------------------------------------

    def _loras(self, adapters: AdapterScales) -> tuple[list, tuple]:
        """The graph's LoRA sources for these adapters (uploaded when new or changed) and a program key."""
        provs, key = [], []
        for ad, s in adapters:
            if float(s) == 0.0:
                continue
            slot = self._slots.get(ad.uid)
            if slot is None:
                while len(self._slots) >= self._max_slots:
                    self._evict(next(iter(self._slots)))
                slot = self._slots[ad.uid] = AdapterSlot(self.rt, self.args, ad)
            self._slots.move_to_end(ad.uid)
            slot.write(ad)
            provs.append(SlotLora(slot, float(s) * ad.config.scale))
            key.append((ad.uid, float(s) * ad.config.scale))
        return provs, tuple(key)

    def _evict(self, uid):
        """Drop an adapter slot and every program that reads it."""
        slot = self._slots.pop(uid)
        for key in [k for k in self._programs if any(u == uid for u, _ in k[-1])]:
            self._programs.pop(key).acts.free()
        if self._arena is not None:
            for key in [k for k in self._arena.programs if any(u == uid for u, _ in k)]:
                for p in self._arena.programs.pop(key):
                    p.acts.free()
        self.rt.free(slot.buf)

    def _program(self, key, build) -> Program:
        prog = self._programs.get(key)
        if prog is None:
            while len(self._programs) >= self._max_programs:
                _, old = self._programs.popitem(last=False)
                old.acts.free()
            prog = self._programs[key] = build()
        self._programs.move_to_end(key)
        return prog

    # -- logits and loss (tests, evaluation) -----------------------------------------------------------

    def logits(self, tokens, adapters: AdapterScales = ()) -> np.ndarray:
        """(B, T, V) logits — for tests and small inputs only."""
        g, tokens = self.graph, np.asarray(tokens)
        B, T = tokens.shape
        N, V, D = B * T, self.args.vocab_size, self.args.hidden_size
        provs, akey = self._loras(adapters)

        def build():
            S = Acts(self.rt, self.args, B, T)
            ops = g.forward_ops(S, provs)
            out = S.alloc(N * V, "logits")
            ops.append(K.matmul(self.rt, S.hf, g.out, out, N, V, D))
            return Program(ops, S, out)

        prog = self._program(("logits", B, T, akey), build)
        g.write_inputs(prog.acts, tokens)
        assert prog.out is not None  # build() gives the logits buffer
        raw = self.rt.run(prog.ops, read=prog.out, read_bytes=4 * N * V, label="logits")
        return raw.view(np.float32).reshape(B, T, V).copy()

    def loss(self, tokens, labels, adapters: AdapterScales = (), segments=None, positions=None) -> float:
        g = self.graph
        tokens, labels = np.asarray(tokens), np.asarray(labels)
        B, T = tokens.shape
        provs, akey = self._loras(adapters)

        def build():
            S = Acts(self.rt, self.args, B, T)
            ops = g.forward_ops(S, provs, segments=True)
            st, loss = S.alloc(S.N * 4, "ce_state"), S.alloc(4, "loss")
            g.cross_entropy_forward(ops, S, S.hf, st, loss)
            return Program(ops, S, loss)

        prog = self._program(("loss", B, T, akey), build)
        seg = np.zeros((B, T), np.int32) if segments is None else segments
        g.write_inputs(prog.acts, tokens, positions, labels, seg)
        assert prog.out is not None  # build() gives the loss buffer
        total = float(self.rt.run(prog.ops, read=prog.out, read_bytes=4, label="loss").view(np.float32)[0])
        n = int((labels != R.IGNORE).sum())
        return total / max(n, 1)

    # -- decoding ---------------------------------------------------------------------------------------

    def _arena_for(self, need: int) -> DecodeArena:
        a = self._arena
        if a is None or a.cap < need:
            if a is not None:
                a.free()
            cap = max(512, 1 << (need - 1).bit_length())  # grows by doubling: few rebuilds
            cap = -(-cap // self.prefill_chunk) * self.prefill_chunk
            a = self._arena = DecodeArena(self.graph, cap, self.prefill_chunk)
        return a

    def _decode_programs(self, arena: DecodeArena, provs, akey) -> tuple[Program, Program]:
        hit = arena.programs.get(akey)
        if hit is not None:
            arena.programs.move_to_end(akey)
            return hit
        while len(arena.programs) >= self._max_programs:
            _, old = arena.programs.popitem(last=False)
            for p in old:
                p.acts.free()
        g, rt, a = self.graph, self.rt, self.args
        V, D = a.vocab_size, a.hidden_size
        # the token program: embed S1.tok at position dyn[0] ... logits, sample, advance
        S1 = Acts(rt, a, 1, 1)
        logits = S1.alloc(V, "logits")
        head = [K.matmul(rt, S1.hf, g.out, logits, 1, V, D, mode="gemv"),
                *K.sample(rt, logits, arena.samp, arena.ids, S1.tok, arena.dyn, S1.pos, 1, V, V, RING)]
        token = Program(g.forward_ops(S1, provs, cache=arena) + head, S1, logits, {"head": head})
        # the prefill program of one chunk: tokens and positions come in by copies (see _prefill_ops)
        C = arena.chunk
        Sc = Acts(rt, a, 1, C)
        chunk = Program(g.forward_ops(Sc, provs, cache=arena), Sc)
        arena.programs[akey] = (chunk, token)
        return chunk, token

    def _prefill_ops(self, arena: DecodeArena, chunk: Program, token: Program, n_prompt: int) -> list:
        C, D = arena.chunk, self.args.hidden_size
        ops: list = []
        n_chunks = -(-n_prompt // C)
        for j in range(n_chunks):
            ops += [Copy(arena.prompt, 4 * j * C, chunk.acts.tok, 0, 4 * C),
                    Copy(arena.positions, 4 * j * C, chunk.acts.pos, 0, 4 * C),
                    Copy(arena.chunk_dyn, 16 * j, arena.dyn, 0, 16)]
            ops += chunk.ops
        last = n_prompt - 1 - (n_chunks - 1) * C  # the prompt's last row in the last chunk
        ops += [Copy(chunk.acts.hf, 4 * last * D, token.acts.hf, 0, 4 * D), Copy(arena.dyn_last, 0, arena.dyn, 0, 16)]
        return ops + token.extra["head"]

    def decode(self, prompt_ids: Sequence[int], max_tokens: int, sampling: Sampling = Sampling(),
               adapters: AdapterScales = ()) -> Generator[int, None, None]:
        """Token ids after the prompt (batch 1), sampled on the GPU; see the module docstring."""
        prompt = np.asarray([int(t) for t in prompt_ids], np.int32)
        P, V = len(prompt), self.args.vocab_size
        if P == 0:
            raise WebGPUError("the prompt is empty; give at least one token")
        if prompt.min() < 0 or prompt.max() >= V:
            raise WebGPUError(f"token ids must be in [0, {V}); got {int(prompt.min())}..{int(prompt.max())}")
        max_pos = self.graph.max_pos
        max_tokens = int(min(max_tokens, max_pos - P))
        if max_tokens < 1:
            raise WebGPUError(f"the prompt has {P} tokens but the model's context holds {max_pos}; shorten it")
        return self._decode(prompt, max_tokens, sampling, list(adapters))

    def _decode(self, prompt, max_tokens, sampling: Sampling, adapters) -> Generator[int, None, None]:
        rt, P = self.rt, len(prompt)
        arena = self._arena_for(max(P + max_tokens, -(-P // self.prefill_chunk) * self.prefill_chunk))
        provs, akey = self._loras(adapters)
        chunk, token = self._decode_programs(arena, provs, akey)
        padded = np.zeros(-(-P // arena.chunk) * arena.chunk, np.int32)
        padded[:P] = prompt
        rt.write(arena.prompt, padded)
        rt.write(arena.dyn_last, np.array([P - 1, 0, 0, 0], np.uint32))
        rt.write(arena.samp, K.sampling_words(sampling.seed, sampling.temperature, sampling.top_k, sampling.top_p))
        # batch 0: the prompt and the first token; then 1, 2, 4 ... tokens a submit, one batch in flight ahead
        batches: list[tuple[list | None, int, int]] = [(self._prefill_ops(arena, chunk, token, P), 0, 1)]
        n = 1
        size = 1
        while n < max_tokens:
            k = min(size, max_tokens - n)
            batches.append((None, n, k))
            n += k
            size = min(2 * size, MAX_BATCH)
        inflight = None  # (PendingRead, first counter, count) submitted and not read yet
        try:
            for i, (ops, c0, k) in enumerate(batches):
                sub = (rt.submit(ops if ops is not None else token.ops * k, read=arena.ids, read_bytes=4 * RING,
                                 label="decode", slot=i % 2), c0, k)
                done, inflight = inflight, sub
                if done is not None:
                    yield from self._ids(done)
            done, inflight = inflight, None
            yield from self._ids(done)
        finally:
            if inflight is not None:  # the consumer stopped early: the batch in flight must land before reuse
                inflight[0].result()

    @staticmethod
    def _ids(done) -> Iterator[int]:
        pending, c0, k = done
        ring = pending.result().view(np.int32)
        for c in range(c0, c0 + k):
            yield int(ring[c % RING])

    # -- training --------------------------------------------------------------------------------------

    def train_session(self, adapter: LoraAdapter, optim: OptimSettings = OptimSettings()) -> WebGPUTrainSession:
        return WebGPUTrainSession(self.graph, adapter, optim)

    def plan_buffers(self, batch: int, seq: int, lora_config, optim: str = "adamw", recompute: bool = False) -> list:
        """[(name, part, nbytes)] this engine and a train session allocate for (batch, seq), without allocating:
        the same code run on a sizing runtime with this device's limits and kernel variants (sizing.py)."""
        return plan_buffers(self.model, batch, seq, lora_config, optim, dict(self.rt.limits), self.rt.tiled,
                            self.graph.vocab_chunk, self.graph.ce_row_chunk, recompute)

    def memory_plan(self, batch: int, seq: int, lora_config, optim: str = "adamw",
                    recompute: bool = False) -> MemoryPlan:
        """The buffers of plan_buffers by part, the weights' load peak with the upload's staging (sizing.py)."""
        return memory_plan(self.model, batch, seq, lora_config, optim, dict(self.rt.limits), self.rt.tiled,
                           self.graph.vocab_chunk, self.graph.ce_row_chunk, recompute)

    def forget_compiled(self) -> None:
        """The runtime's shader modules and pipelines built again on next use (programs already recorded keep theirs)."""
        self.rt.forget_compiled()

    def memory_in_use(self) -> int:
        """Live buffer bytes of this device's runtime: every engine's weights, caches and arenas on it."""
        return int(self.rt.live_bytes)

    def close(self):
        """Free every GPU buffer of this engine (weights, programs, the decode arena, adapter slots): call it
        when the model is unloaded so the device memory comes back at once, not whenever Python collects it."""
        for prog in self._programs.values():
            prog.acts.free()
        self._programs.clear()
        if self._arena is not None:
            self._arena.free()
            self._arena = None
        for slot in self._slots.values():
            self.rt.free(slot.buf)
        self._slots.clear()
        self.graph.close()
