"""Datasets: formats, loss masks, chat masking, packing, validation split, cache, problem reports."""

import json

import numpy as np
import pytest

from loralabd.engine.numpy_engine import NumpyEngine
from loralabd.models import load_model
from loralabd.training import Dataset, DatasetError
from loralabd.training.data import read_source
from loralabd.training.packing import DataStream, eval_batches, make_batch

from conftest import write_tiny_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    write_tiny_hf_model(d, "llama")
    return load_model(d, weights="f32")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def trained_text(tok, e):
    """Decoded tokens that are prediction targets (mask), as the loss sees them (position 0 never is)."""
    return tok.decode([t for t, m in zip(e.ids[1:].tolist(), e.mask[1:].tolist()) if m])


def test_formats_and_masks(tiny, tmp_path):
    tok = tiny.tokenizer
    write_jsonl(tmp_path / "t.jsonl", [{"text": "the quick brown fox"}])
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "hello world, ", "completion": "the lazy dog"}])
    kw = dict(cache_dir=False)
    t = read_source(tmp_path / "t.jsonl", tok, **kw)
    assert t.format == "text" and not t.problems
    assert tok.decode(t.examples[0].ids.tolist()) == "the quick brown fox<|im_end|>"
    assert t.examples[0].mask.all()
    c = read_source(tmp_path / "c.jsonl", tok, **kw)
    assert c.format == "completion"
    e = c.examples[0]
    assert tok.decode(e.ids.tolist()) == "hello world, the lazy dog<|im_end|>"
    assert trained_text(tok, e) == "the lazy dog<|im_end|>"  # loss on completion + eos only


def test_chat_masking_only_assistant_tokens_count(tiny, tmp_path):
    """Only assistant tokens are targets, in a multi-turn chat with a system message; and the engine's loss
    over the packed batch equals the cross-entropy of exactly those tokens computed from full logits."""
    tok = tiny.tokenizer
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
            {"role": "assistant", "content": "the quick fox"}, {"role": "user", "content": "this is tiny"},
            {"role": "assistant", "content": "the lazy dog"}]
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": msgs}])
    ds = Dataset.load(tmp_path / "chat.jsonl", tok, cache_dir=False)
    e = ds.train[0]
    assert tok.decode(e.ids.tolist()) == tok.render_chat(msgs, add_generation_prompt=False)
    assert trained_text(tok, e) == "the quick fox<|im_end|>\nthe lazy dog<|im_end|>\n"
    # no user, system or role-header token is a target
    spans = [tok.decode(e.ids[i:j].tolist()) for i, j in _runs(e.mask)]
    assert spans == ["the quick fox<|im_end|>\n", "the lazy dog<|im_end|>\n"]

    b = make_batch(ds.train, [[0]], 128, tok.eos_id)
    eng = NumpyEngine(tiny)
    logits = eng.logits(b.tokens)[0].astype(np.float64)  # (T, V)
    lp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    n = len(e)
    want = [-lp[t, e.ids[t + 1]] for t in range(n - 1) if e.mask[t + 1]]
    got = eng.loss(b.tokens, b.labels, segments=b.segments, positions=b.positions)
    assert abs(got - np.mean(want)) <= 1e-4 * abs(np.mean(want))
    assert b.n_targets == len(want) == int(e.mask[1:].sum())


def _runs(mask):
    out, i = [], 0
    m = mask.tolist()
    while i < len(m):
        if m[i]:
            j = i
            while j < len(m) and m[j]:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def test_packing_matches_examples_one_by_one(tiny, tmp_path):
    """A packed row (segments + restarting positions) gives the loss the examples give separately."""
    tok = tiny.tokenizer
    rows = [{"prompt": f"hello {'world ' * k}", "completion": f"the quick brown fox {k}"} for k in range(4)]
    write_jsonl(tmp_path / "p.jsonl", rows)
    ds = Dataset.load(tmp_path / "p.jsonl", tok, cache_dir=False)
    eng = NumpyEngine(tiny)
    packed = make_batch(ds.train, [[0, 1, 2, 3]], 256, tok.eos_id)
    assert packed.tokens.shape[0] == 1 and set(packed.segments[0, :sum(len(e) for e in ds.train)]) == {0, 1, 2, 3}
    got = eng.loss(packed.tokens, packed.labels, segments=packed.segments, positions=packed.positions)
    tot, n = 0.0, 0
    for i in range(4):
        b = make_batch(ds.train, [[i]], 256, tok.eos_id)
        tot += eng.loss(b.tokens, b.labels) * b.n_targets
        n += b.n_targets
    assert n == packed.n_targets
    assert abs(got - tot / n) <= 1e-5 * abs(tot / n)


def test_malformed_reports_every_line(tiny, tmp_path):
    tok = tiny.tokenizer
    chat = lambda a: {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": a}]}  # noqa: E731
    rows = [chat("the quick fox"),                                   # 1 ok
            '{"messages": [{"role": "user", "content": "hi"}',       # 2 bad JSON
            "",                                                      # 3 blank
            {"text": "the lazy dog"},                                # 4 wrong format for a chat file
            {"messages": [{"role": "user"}]},                        # 5 message without content
            {"messages": [{"role": "user", "content": "hi"}]},       # 6 no assistant turn
            chat("   "),                                             # 7 empty assistant
            chat("the quick brown fox " * 40),                       # 8 over-long: truncated, kept
            "[1, 2]",                                                # 9 not an object
            {"messages": "hello"},                                   # 10 wrong type
            chat("the lazy dog")]                                    # 11 ok
    write_jsonl(tmp_path / "bad.jsonl", rows)
    ds = Dataset.load(tmp_path / "bad.jsonl", tok, max_seq_len=64, cache_dir=False)
    got = [(p.line, p.kind) for p in ds.problems]
    assert got == [(2, "bad_json"), (3, "blank_line"), (4, "missing_field"), (5, "missing_field"),
                   (6, "no_target"), (7, "empty"), (8, "too_long"), (9, "bad_json"), (10, "bad_field")]
    assert [e.line for e in ds.train] == [1, 8, 11]
    assert len(ds.train[1]) == 64
    assert all(str(tmp_path / "bad.jsonl") + f":{ln}:" in ds.problem_report() for ln, _ in got)
    report = ds.inspect()
    assert len(report["problems"]) == 9 and report["train"]["examples"] == 3

    # the other formats' own problems
    write_jsonl(tmp_path / "c.jsonl", [{"prompt": "a", "completion": "the dog"}, {"prompt": "a"},
                                        {"prompt": "a", "completion": ""}, {"prompt": 3, "completion": "x"}])
    c = Dataset.load(tmp_path / "c.jsonl", tok, cache_dir=False)
    assert [(p.line, p.kind) for p in c.problems] == [(2, "missing_field"), (3, "empty"), (4, "bad_field")]
    write_jsonl(tmp_path / "t.jsonl", [{"text": "the dog"}, {"text": ""}, {"txt": "x"}, {"text": ["x"]}])
    t = Dataset.load(tmp_path / "t.jsonl", tok, cache_dir=False)
    assert [(p.line, p.kind) for p in t.problems] == [(2, "empty"), (3, "missing_field"), (4, "bad_field")]
    write_jsonl(tmp_path / "none.jsonl", ["{oops", {"foo": 1}])
    with pytest.raises(DatasetError, match="no usable training example.*none.jsonl:1: bad_json"):
        Dataset.load(tmp_path / "none.jsonl", tok, cache_dir=False)


def test_text_folder_glob_and_binary(tiny, tmp_path):
    tok = tiny.tokenizer
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "a.py").write_text("the quick brown fox jumps over the lazy dog\n" * 20)
    (tmp_path / "src" / "pkg" / "b.py").write_text("hello world\n")
    (tmp_path / "src" / "notes.md").write_text("not included by the glob")
    (tmp_path / "src" / "blob.py").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "src" / ".hidden").mkdir()
    (tmp_path / "src" / ".hidden" / "c.py").write_text("hidden")
    ds = Dataset.load(tmp_path / "src", tok, glob="**/*.py", max_seq_len=32, cache_dir=False)
    files = {e.file.split("/src/")[1] for e in ds.train}
    assert files == {"a.py", "pkg/b.py"}
    assert [(p.file.split("/src/")[1], p.kind) for p in ds.problems] == [("blob.py", "not_text")]
    assert all(len(e) <= 32 for e in ds.train)
    # long documents are cut into chunks that together hold every token
    a = [e for e in ds.train if e.file.endswith("a.py")]
    assert len(a) > 1 and tok.decode(np.concatenate([e.ids for e in a]).tolist()).startswith("the quick brown fox")


def test_valid_split_seeded_and_file(tiny, tmp_path):
    tok = tiny.tokenizer
    write_jsonl(tmp_path / "d.jsonl", [{"text": f"the quick fox {i}"} for i in range(50)])
    a = Dataset.load(tmp_path / "d.jsonl", tok, valid_fraction=0.2, seed=1, cache_dir=False)
    b = Dataset.load(tmp_path / "d.jsonl", tok, valid_fraction=0.2, seed=1, cache_dir=False)
    c = Dataset.load(tmp_path / "d.jsonl", tok, valid_fraction=0.2, seed=2, cache_dir=False)
    assert len(a.valid) == 10 and len(a.train) == 40
    assert [e.line for e in a.valid] == [e.line for e in b.valid] != [e.line for e in c.valid]
    assert not {e.line for e in a.valid} & {e.line for e in a.train}
    write_jsonl(tmp_path / "v.jsonl", [{"text": "hello world"}])
    d = Dataset.load(tmp_path / "d.jsonl", tok, valid=tmp_path / "v.jsonl", cache_dir=False)
    assert len(d.train) == 50 and len(d.valid) == 1
    assert len(eval_batches(d.valid, 64, 4, tok.eos_id)) == 1


def test_tokenization_cache(tiny, tmp_path):
    tok = tiny.tokenizer
    cache = tmp_path / "cache"
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "the quick fox"}, "{bad"])
    a = Dataset.load(f, tok, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 1
    b = Dataset.load(f, tok, cache_dir=cache)  # from the cache: same tokens, same problems
    assert [e.ids.tolist() for e in a.train] == [e.ids.tolist() for e in b.train]
    assert [str(p) for p in a.problems] == [str(p) for p in b.problems] and b.problems[0].line == 2
    write_jsonl(f, [{"text": "the lazy dog"}])  # new content -> new key
    c = Dataset.load(f, tok, cache_dir=cache)
    assert len(list(cache.glob("*.npz"))) == 2 and tok.decode(c.train[0].ids.tolist()) == "the lazy dog<|im_end|>"
    Dataset.load(f, tok, max_seq_len=16, cache_dir=cache)  # other settings -> other key
    assert len(list(cache.glob("*.npz"))) == 3


def test_stream_is_reproducible_and_resumable(tiny, tmp_path):
    tok = tiny.tokenizer
    write_jsonl(tmp_path / "d.jsonl", [{"text": "the quick fox " * (1 + i % 5)} for i in range(30)])
    ds = Dataset.load(tmp_path / "d.jsonl", tok, cache_dir=False)
    s1 = DataStream(ds.train, 64, 3, tok.eos_id, seed=5)
    seq = [s1.next_batch().tokens for _ in range(12)]  # crosses epochs
    assert s1.epoch >= 1
    s2 = DataStream(ds.train, 64, 3, tok.eos_id, seed=5)
    for _ in range(5):
        s2.next_batch()
    st = s2.state()
    s3 = DataStream(ds.train, 64, 3, tok.eos_id, seed=5)
    s3.load_state(st)
    assert all(np.array_equal(s3.next_batch().tokens, seq[i]) for i in range(5, 12))
    other = DataStream(ds.train, 64, 3, tok.eos_id, seed=6)
    assert not np.array_equal(other.next_batch().tokens, seq[0])
    # every example appears exactly once per epoch
    rows = s1.rows(1)
    assert sorted(i for r in rows for i in r) == list(range(len(ds.train)))
    assert all(sum(len(ds.train[i]) for i in r) <= 64 for r in rows)


def test_json_array_file(tiny, tmp_path):
    tok = tiny.tokenizer
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "hello ", "completion": "the dog"}, {"prompt": "x"}]))
    ds = Dataset.load(tmp_path / "d.json", tok, cache_dir=False)
    assert ds.format == "completion" and len(ds.train) == 1
    assert [(p.line, p.kind) for p in ds.problems] == [(2, "missing_field")]  # record 2
    (tmp_path / "bad.json").write_text('[{"text": "a"},\n {"text": }]')
    r = read_source(tmp_path / "bad.json", tok, cache_dir=False)
    assert [(p.line, p.kind) for p in r.problems] == [(2, "bad_json")]


# -- bounded reading (issue 12): streamed line by line, with stated limits ------------------------------------

def test_a_line_over_the_record_limit_is_skipped_without_tokenizing_it(tiny, tmp_path):
    from loralabd.training import data

    tok = tiny.tokenizer
    huge = "w" * (5 * data.MIB)  # one word: the slowest thing to tokenize
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "hello world"}, {"text": huge}, {"text": "the lazy dog"}])
    seen = []
    r = read_source(f, tok, cache_dir=False, progress=lambda done, total: seen.append((done, total)))
    assert [e.line for e in r.examples] == [1, 3]
    assert [(p.line, p.kind) for p in r.problems] == [(2, "too_big")]
    assert "a line of 5.0 MiB is over the limit of 1.0 MiB" in r.problems[0].message
    size = f.stat().st_size
    assert seen and all(t == size for _, t in seen) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    # a text file with such a line is skipped whole, with its line number
    t = tmp_path / "notes.txt"
    t.write_text("first line\n" + huge + "\nlast line\n")
    r = read_source(t, tok, cache_dir=False)
    assert not r.examples and [(p.line, p.kind) for p in r.problems] == [(2, "too_big")]


def test_files_over_the_size_limits_are_refused_before_reading(tiny, tmp_path):
    from loralabd.training import data

    tok = tiny.tokenizer
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:  # sparse: the size is all that is looked at
        f.truncate(data.MAX_FILE_BYTES + 1)
    r = read_source(big, tok, cache_dir=False)
    assert not r.examples and r.problems[0].kind == "too_big" and "limit of 256.0 MiB" in r.problems[0].message
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(5):
        with open(folder / f"part{i}.txt", "wb") as f:
            f.truncate(data.MAX_TOTAL_BYTES // 4)
    with pytest.raises(DatasetError, match=r"hold 1280\.0 MiB, over the limit of 1024\.0 MiB"):
        read_source(folder, tok, cache_dir=False)
    arr = tmp_path / "array.json"
    with open(arr, "wb") as f:
        f.write(b'[{"text": "a"}')
        f.truncate(data.MAX_ARRAY_BYTES + 1)
    r = read_source(arr, tok, cache_dir=False)
    assert r.problems[0].kind == "too_big" and "write it as JSONL" in r.problems[0].message


def test_big_text_files_are_tokenized_in_blocks_of_whole_lines(tiny, tmp_path, monkeypatch):
    """A text file over TEXT_BLOCK is tokenized a block of lines at a time (memory bounded) into the same tokens as
    at once, for a byte-level tokenizer; a smaller one is tokenized whole, as always."""
    from loralabd.training import data

    tok = tiny.tokenizer
    lines = [f"the quick brown fox {i} jumps over the lazy dog.\n\n  hello world, {i * 7}\n" for i in range(300)]
    t = tmp_path / "doc.txt"
    t.write_text("".join(lines))
    whole = read_source(t, tok, cache_dir=False, max_seq_len=64)
    monkeypatch.setattr(data, "TEXT_BLOCK", 1000)
    blocks = read_source(t, tok, cache_dir=False, max_seq_len=64)
    assert len(blocks.examples) == len(whole.examples) > 10
    for a, b in zip(whole.examples, blocks.examples):
        assert a.ids.tolist() == b.ids.tolist() and a.mask.tolist() == b.mask.tolist()


def test_records_that_are_no_text_are_reported(tiny, tmp_path):
    f = write_jsonl(tmp_path / "s.jsonl", ['{"text": "lone \\ud800 surrogate"}', {"text": "fine"}])
    r = read_source(f, tiny.tokenizer, cache_dir=False)
    assert [e.line for e in r.examples] == [2]
    assert [(p.line, p.kind) for p in r.problems] == [(1, "bad_field")] and "not valid Unicode" in r.problems[0].message
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    r = read_source(bad, tiny.tokenizer, cache_dir=False)
    assert not r.examples and [(p.line, p.kind) for p in r.problems] == [(None, "not_text")]
    assert "line 2" in r.problems[0].message
