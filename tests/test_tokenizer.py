"""Our tokenizer (built from the GGUF, and read from tokenizer.json) against transformers' tokenizer."""

import random

import pytest

from loralabd.tokenizer import Tokenizer


def varied_text(seed=0, n_chars=12000) -> str:
    rng = random.Random(seed)
    pieces = [
        "The quick brown fox jumps over the lazy dog. ",
        "Ünïcödé façade — naïve café, 東京都 は 日本の首都です。 Москва, Ελλάδα, עברית, العربية. ",
        "emoji: 🙂👍🏽🚀 and ZWJ 👩‍💻 ",
        "def f(x):\n\treturn {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
        "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\n",
        "    indented    with   runs   of     spaces\n\n\n",
        "\t\ttabs\tand\r\nwindows newlines\r\n",
        "numbers 1234567890 3.14159 -42 1e-5 0x1F 2026-11-26 ",
        "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n",
        "<|endoftext|>", "<file_sep>", "<repo_name>",
        "URLs: https://example.com/path?q=1&r=2#frag ",
        "MiXeD CaSe, ALLCAPS, snake_case, camelCase, kebab-case. ",
        "¿Qué? ¡Sí! «quotes» „low“ ‚single‘ ",
        "math: ∑ᵢ xᵢ² ≤ ∞, √2 ≈ 1.414, ∂f/∂x ",
        "I'm, you're, it's, we'll, they'd, I've ",
        "   leading spaces", "trailing spaces    ", "\n", " ", "  ",
    ]
    out = []
    while sum(map(len, out)) < n_chars:
        out.append(rng.choice(pieces))
    return "".join(out)


@pytest.fixture(scope="module")
def hf_tok(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_path.parent), gguf_file=default_model_path.name)


@pytest.fixture(scope="module")
def texts():
    return [varied_text(s) for s in range(3)] + [varied_text(10, 300) for _ in range(1)]


def _hf_ids(hf_tok, text):
    return hf_tok(text, add_special_tokens=False)["input_ids"]


def test_gguf_tokenizer_matches_hf(default_model, hf_tok, texts):
    ours = default_model.tokenizer
    assert sum(map(len, texts)) >= 10_000
    for t in texts:
        assert ours.encode(t) == _hf_ids(hf_tok, t)
    # line by line too, so a mismatch points at its piece
    for line in texts[0].splitlines(keepends=True):
        assert ours.encode(line) == _hf_ids(hf_tok, line), repr(line)


def test_tokenizer_json_matches_hf(hf_tok, texts, tmp_path):
    hf_tok.save_pretrained(tmp_path)
    ours = Tokenizer.from_hf_dir(tmp_path)
    for t in texts:
        assert ours.encode(t) == _hf_ids(hf_tok, t)


def test_decode_roundtrip(default_model, texts):
    tok = default_model.tokenizer
    for t in texts:
        assert tok.decode(tok.encode(t)) == t


def test_special_tokens_are_single_ids(default_model):
    tok = default_model.tokenizer
    assert tok.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert tok.bos_id == 1 and tok.eos_id == 2


def test_chat_template_matches_hf(default_model, hf_tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there!"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "2+2?"}]
    ours = default_model.tokenizer.render_chat(msgs)
    ref = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours == ref
    assert default_model.tokenizer.encode_chat(msgs) == hf_tok.apply_chat_template(
        msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
