"""Does llama.cpp apply our GGUF LoRA export the way we do?  (needs `pip install llama-cpp-python`)

1. Default model (Q4_1): the change in logits the adapter causes (with minus without) in llama.cpp
   against ours: cosine over all positions x vocab (and per position, reported). (llama.cpp quantizes activations to 8 bits for Q4 matmuls, so
   compare the adapter's *effect*, not raw logits — see REFERENCE.md's fidelity note.)
2. An f16 GGUF of the same base (every tensor dequantized): greedy tokens with the adapter, llama.cpp
   against our engine reading the same f16 file.

    .venv/bin/python benchmarks/check_llamacpp_lora.py [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loralabd.engine.lora import LoraAdapter, LoraConfig  # noqa: E402
from loralabd.engine.numpy_engine import NumpyEngine  # noqa: E402
from loralabd.export.gguf_lora import save_gguf_lora  # noqa: E402
from loralabd.generation import GenerationService  # noqa: E402
from loralabd.models import default_model_path, load_model  # noqa: E402

TEXT = ("The history of the Roman Empire spans more than a thousand years, from the founding of the city to "
        "the fall of Constantinople. Historians usually divide it into the Republic, the Principate and the "
        "Dominate, each with its own institutions.")
QUESTION = "What is the capital of France? Answer in one sentence, then name two famous museums there."


def trained_looking_adapter(args, seed=7, b_std=0.1) -> LoraAdapter:
    """PEFT init for A, random non-zero B (r=8, alpha=16, all 7 projections): on the default model it
    changes the weights by ~|ΔW|/|W| reported as `weight_change`, and the top-1 prediction at about a
    third of the positions — a strong but plausible fine-tune. A much weaker one drowns in llama.cpp's
    own 8-bit activation noise on Q4 weights (its base logits differ from exact f32 by ~3% of their norm)."""
    ad = LoraAdapter.init(args, LoraConfig(r=8, alpha=16), seed=seed)
    rng = np.random.default_rng(seed + 1)
    for k in ad.B:
        ad.B[k][:] = rng.standard_normal(ad.B[k].shape).astype(np.float32) * b_std
    return ad


def write_f16_gguf(src: Path, dst: Path) -> Path:
    """The same model with every tensor dequantized to f16 (1-D norms stay f32): metadata copied."""
    import gguf

    r = gguf.GGUFReader(str(src))
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(str(dst), arch)
    for k, f in r.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        if k == "general.file_type":
            w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(f.types) > 1 else None
        w.add_key_value(k, f.contents(), vtype, sub)
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type)  # numpy order (rows, cols)
        w.add_tensor(t.name, x.astype(np.float32 if x.ndim == 1 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def llama_logits(model_path, ids, lora_path=None):
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=512,
                n_threads=2, n_batch=512, logits_all=True, verbose=False, seed=0)
    llm.eval(ids)
    out = np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)
    llm.close()
    return out


def llama_greedy(model_path, ids, n, lora_path=None, stop=None):
    from llama_cpp import Llama

    llm = Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=512,
                n_threads=2, verbose=False, seed=0)
    out = []
    for t in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        if t == stop or len(out) == n:
            break
        out.append(int(t))
    llm.close()
    return out


def cosine_rows(a, b):
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def run(workdir: Path) -> dict:
    workdir = Path(workdir)
    src = default_model_path()
    model = load_model(src)
    tok = model.tokenizer
    ad = trained_looking_adapter(model.args)
    lora = save_gguf_lora(ad, workdir / "adapter.gguf", model.args, name="check")
    eng = NumpyEngine(model)

    # 1. effect of the adapter on the Q4_1 model: cosine over all positions x vocab, and per position
    ids = tok.encode(TEXT)
    t0 = time.perf_counter()
    base = eng.logits(np.array([ids]))[0]  # (T, V)
    with_ = eng.logits(np.array([ids]), [(ad, 1.0)])[0]
    ours_d = with_ - base
    lc_base = llama_logits(src, ids)
    lc_with = llama_logits(src, ids, lora)
    lc_d = lc_with - lc_base
    cos = cosine_rows(ours_d, lc_d)
    dw = [np.linalg.norm(ad.config.scale * ad.B[k] @ ad.A[k]) / np.linalg.norm(eng.W(int(k.split(".")[0]), k.split(".")[1]))
          for k in ad.keys()]
    res = {"positions": len(ids), "cosine": float(cosine_rows(ours_d.ravel(), lc_d.ravel())),
           "cosine_per_position_mean": float(cos.mean()), "cosine_per_position_min": float(cos.min()),
           "base_cosine_llamacpp_vs_ours": float(cosine_rows(base.ravel(), lc_base.ravel())),
           "top1_changed_by_adapter": float((with_.argmax(-1) != base.argmax(-1)).mean()),
           "top1_agree_with_adapter": float((with_.argmax(-1) == lc_with.argmax(-1)).mean()),
           "weight_change": float(np.median(dw)), "check1_s": round(time.perf_counter() - t0, 1)}

    # 2. greedy with the adapter on an f16 GGUF of the same base
    t0 = time.perf_counter()
    f16 = write_f16_gguf(src, workdir / "base-f16.gguf")
    m16 = load_model(f16)
    e16 = NumpyEngine(m16)
    q = tok.encode_chat([{"role": "user", "content": QUESTION}])
    n = 32

    svc = GenerationService(e16)
    ours_g = svc.generate(prompt_ids=q, max_tokens=n, adapters=[(ad, 1.0)], stop_ids=[]).token_ids
    lc_g = llama_greedy(f16, q, n, lora)
    base_g = svc.generate(prompt_ids=q, max_tokens=n, stop_ids=[]).token_ids
    agree = next((i for i, (a, b) in enumerate(zip(ours_g, lc_g)) if a != b), min(len(ours_g), len(lc_g)))
    # the adapter's effect on the f16 base, where llama.cpp's activations are not 8-bit: per position
    d16 = e16.logits(np.array([ids]), [(ad, 1.0)])[0] - e16.logits(np.array([ids]))[0]
    l16 = llama_logits(f16, ids, lora) - llama_logits(f16, ids)
    res.update(greedy_agree=agree, greedy_tokens=n, ours=tok.decode(ours_g), llama_cpp=tok.decode(lc_g),
               base_without_adapter=tok.decode(base_g), adapter_changes_greedy=base_g != ours_g,
               f16_cosine_per_position_min=float(cosine_rows(d16, l16).min()),
               check2_s=round(time.perf_counter() - t0, 1))
    return res


def passed(res) -> bool:
    """The acceptance: the adapter's effect (all >= 32 positions) at cosine >= 0.99 on Q4_1, and >= 16
    greedy tokens the same on f16 with an adapter that changes them."""
    return (res["cosine"] >= 0.99 and res["positions"] >= 32 and res["greedy_agree"] >= 16
            and res["adapter_changes_greedy"])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=None)
    a = ap.parse_args()
    if a.workdir:
        a.workdir.mkdir(parents=True, exist_ok=True)
        res = run(a.workdir)
    else:
        with tempfile.TemporaryDirectory() as d:
            res = run(Path(d))
    print(json.dumps(res, indent=2, ensure_ascii=False))
    ok = passed(res)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
