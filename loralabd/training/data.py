"""Datasets: text files and folders, JSONL (text | prompt/completion | messages), validation split,
on-disk tokenization cache, inspection with line-numbered problems.

Every example becomes (ids, mask): mask[t] says whether predicting ids[t] counts in the loss
(completion / assistant tokens only, where the format has them). Packing is in packing.py.
Nothing is dropped silently: every line that is skipped or truncated is a Problem with its line number.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import LoraLabError
from ..paths import atomic_write_bytes

FORMATS = ("auto", "text", "completion", "chat")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")  # .json: JSONL, or one array of records (numbered from 1)
CACHE_VERSION = 1


class DatasetError(LoraLabError):
    """The dataset cannot be used at all (no file, no usable example); the message says what to fix."""


@dataclass
class Problem:
    file: str
    line: int | None  # 1-based; None for a whole file
    kind: str  # bad_json | missing_field | bad_field | empty | too_long | no_target | template | not_text | blank_line
    message: str

    def __str__(self):
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.kind}: {self.message}"

    def to_dict(self) -> dict:
        return {"file": self.file, "line": self.line, "kind": self.kind, "message": self.message}


@dataclass
class Example:
    ids: np.ndarray  # (n,) int32
    mask: np.ndarray  # (n,) bool: token counts as a prediction target
    file: str
    line: int | None

    def __len__(self):
        return len(self.ids)


@dataclass
class FileResult:
    examples: list[Example] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    format: str = "text"


# -- tokenizer fingerprint and the cache -------------------------------------------------------------

_FP: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tok) -> str:
    """Hash of the whole tokenizer definition and chat template (computed once per tokenizer object)."""
    if tok not in _FP:
        h = hashlib.sha256(tok.tk.to_str().encode())
        h.update(repr((tok.chat_template, tok.bos_token, tok.eos_token, tok.add_bos)).encode())
        _FP[tok] = h.hexdigest()[:24]
    return _FP[tok]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "loralab" / "tokens"


def _cache_key(data: bytes, tok, fmt: str, max_seq_len: int) -> str:
    h = hashlib.sha256(data)
    h.update(f"|{tokenizer_fingerprint(tok)}|{fmt}|{max_seq_len}|v{CACHE_VERSION}".encode())
    return h.hexdigest()[:32]


def _cache_save(path: Path, res: FileResult):
    lens = np.asarray([len(e) for e in res.examples], np.int64)
    buf = io.BytesIO()
    np.savez(buf, ids=np.concatenate([e.ids for e in res.examples]) if res.examples else np.zeros(0, np.int32),
             mask=np.concatenate([e.mask for e in res.examples]) if res.examples else np.zeros(0, bool),
             lens=lens, lines=np.asarray([-1 if e.line is None else e.line for e in res.examples], np.int64),
             meta=np.frombuffer(json.dumps({"format": res.format,
                                            "problems": [p.to_dict() for p in res.problems]}).encode(), np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())


def _cache_load(path: Path, file: str) -> FileResult | None:
    try:
        z = np.load(path)
        meta = json.loads(bytes(z["meta"]).decode())
        ids, mask, lens, lines = z["ids"], z["mask"], z["lens"], z["lines"]
    except Exception:  # a damaged cache entry is rebuilt, never trusted
        return None
    out = FileResult(format=meta["format"], problems=[Problem(**p) for p in meta["problems"]])
    off = np.concatenate([[0], np.cumsum(lens)])
    for i in range(len(lens)):
        ln = int(lines[i])
        out.examples.append(Example(ids[off[i]:off[i + 1]], mask[off[i]:off[i + 1]], file, None if ln < 0 else ln))
    return out


# -- one example per format --------------------------------------------------------------------------

def _eos(tok) -> list[int]:
    return [tok.eos_id] if tok.eos_id is not None else []


def encode_text(tok, text: str):
    ids = tok.encode(text) + _eos(tok)
    return np.asarray(ids, np.int32), np.ones(len(ids), bool)


def encode_completion(tok, prompt: str, completion: str):
    """prompt + completion + eos as raw text (TRL's plain prompt-completion); loss on completion + eos."""
    p = tok.encode(prompt)
    c = tok.encode(completion, add_bos=False) + _eos(tok)
    return np.asarray(p + c, np.int32), np.asarray([False] * len(p) + [True] * len(c))


def assistant_spans(tok, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """Rendered conversation and the character spans of each assistant turn, found by rendering prefixes:
    turn i spans from the end of render(messages[:i], generation prompt) to the end of render(messages[:i+1])."""
    full = tok.render_chat(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tok.render_chat(messages[:i], add_generation_prompt=True) if i else ""
        upto = tok.render_chat(messages[:i + 1], add_generation_prompt=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise ValueError("the chat template does not render conversations prefix by prefix, so assistant turns "
                             "cannot be located; use prompt/completion records instead")
        spans.append((len(before), len(upto)))
    return full, spans


def encode_chat(tok, messages: list[dict]):
    full, spans = assistant_spans(tok, messages)
    enc = tok.tk.encode(full, add_special_tokens=False)
    ids = list(enc.ids)
    mask = [any(s <= a < e for s, e in spans) for a, _ in enc.offsets]
    if tok.add_bos and tok.bos_id is not None and (not ids or ids[0] != tok.bos_id) \
            and not (tok.bos_token and full.startswith(tok.bos_token)):
        ids, mask = [tok.bos_id] + ids, [False] + mask
    return np.asarray(ids, np.int32), np.asarray(mask, bool)


def _check_messages(msgs) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects"
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            return f"messages[{j}] is not an object"
        for f in ("role", "content"):
            if f not in m:
                return f"messages[{j}] has no {f!r}"
            if not isinstance(m[f], str):
                return f"messages[{j}].{f} must be a string"
    return None


def detect_format(obj: dict) -> str | None:
    if "messages" in obj:
        return "chat"
    if "prompt" in obj and "completion" in obj:
        return "completion"
    if "text" in obj:
        return "text"
    return None


def read_jsonl(data: bytes, name: str, tok, fmt: str, max_seq_len: int) -> FileResult:
    res = FileResult(format=fmt)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        res.problems.append(Problem(name, None, "not_text", f"not UTF-8 ({e}); save the file as UTF-8"))
        return res
    if text.lstrip().startswith("["):  # a JSON array of records: "line" numbers count records
        try:
            arr = json.loads(text)
        except json.JSONDecodeError as e:
            res.problems.append(Problem(name, e.lineno, "bad_json", f"not valid JSON ({e.msg} at column {e.colno}); "
                                        "fix it, or write one JSON object per line (JSONL)"))
            return res
        text = "\n".join(json.dumps(x) for x in arr) if isinstance(arr, list) else text
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    for ln, raw in enumerate(lines, 1):
        P = lambda kind, msg: res.problems.append(Problem(name, ln, kind, msg))  # noqa: E731
        if not raw.strip():
            P("blank_line", "blank line skipped")
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            P("bad_json", f"not valid JSON ({e.msg} at column {e.colno}); fix or remove this line")
            continue
        if not isinstance(obj, dict):
            P("bad_json", f"expected a JSON object, got {type(obj).__name__}")
            continue
        kind = res.format if res.format != "auto" else detect_format(obj)
        if kind is None:
            P("missing_field", f"no 'text', 'prompt'+'completion' or 'messages' field (has {sorted(obj)[:6]})")
            continue
        if res.format == "auto":
            res.format = kind  # the first good record decides the file's format
        try:
            if kind == "text":
                if "text" not in obj:
                    P("missing_field", "missing 'text' (this file holds text records)")
                    continue
                if not isinstance(obj["text"], str):
                    P("bad_field", "'text' must be a string")
                    continue
                if not obj["text"].strip():
                    P("empty", "'text' is empty")
                    continue
                ids, mask = encode_text(tok, obj["text"])
            elif kind == "completion":
                miss = [f for f in ("prompt", "completion") if f not in obj]
                if miss:
                    P("missing_field", f"missing {' and '.join(repr(f) for f in miss)} (this file holds "
                                       "prompt/completion records)")
                    continue
                if not isinstance(obj["prompt"], str) or not isinstance(obj["completion"], str):
                    P("bad_field", "'prompt' and 'completion' must be strings")
                    continue
                if not obj["completion"].strip():
                    P("empty", "'completion' is empty: nothing to learn")
                    continue
                ids, mask = encode_completion(tok, obj["prompt"], obj["completion"])
            else:
                if "messages" not in obj:
                    P("missing_field", "missing 'messages' (this file holds chat records)")
                    continue
                err = _check_messages(obj["messages"])
                if err:
                    P("bad_field" if "must" in err or "not an" in err else "missing_field", err)
                    continue
                msgs = obj["messages"]
                if not any(m["role"] == "assistant" for m in msgs):
                    P("no_target", "no assistant message: nothing to learn")
                    continue
                if any(m["role"] == "assistant" and not m["content"].strip() for m in msgs):
                    P("empty", "an assistant message is empty")
                    continue
                ids, mask = encode_chat(tok, msgs)
        except ValueError as e:
            P("template", str(e))
            continue
        except LoraLabError as e:
            P("template", str(e))
            continue
        if len(ids) > max_seq_len:
            P("too_long", f"{len(ids)} tokens > max_seq_len {max_seq_len}: truncated to {max_seq_len}; "
                          "shorten it or raise max_seq_len")
            ids, mask = ids[:max_seq_len], mask[:max_seq_len]
            if not mask[1:].any():
                P("no_target", "nothing left to learn after truncation: the example is skipped")
                continue
        res.examples.append(Example(ids, mask, name, ln))
    if res.format == "auto":
        res.format = "text"
    return res


def read_text(data: bytes, name: str, tok, max_seq_len: int) -> FileResult:
    """A plain-text document, cut into chunks of max_seq_len tokens (each chunk one example)."""
    res = FileResult(format="text")
    if b"\x00" in data[:8192]:
        res.problems.append(Problem(name, None, "not_text", "binary file skipped; narrow the glob to text files"))
        return res
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        res.problems.append(Problem(name, None, "not_text", f"not UTF-8 ({e}); skipped — save it as UTF-8"))
        return res
    if not text.strip():
        res.problems.append(Problem(name, None, "empty", "empty file skipped"))
        return res
    ids, mask = encode_text(tok, text)
    for s in range(0, len(ids), max_seq_len):
        if len(ids) - s >= 2:
            res.examples.append(Example(ids[s:s + max_seq_len], mask[s:s + max_seq_len], name, None))
    return res


def read_file(path: Path, tok, fmt: str = "auto", max_seq_len: int = 512, cache_dir=None,
              name: str | None = None) -> FileResult:
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    data = path.read_bytes()
    name = name or str(path)
    jsonl = path.suffix.lower() in JSONL_SUFFIXES or fmt != "auto"
    key_fmt = fmt if jsonl else "plain"
    cpath = None
    if cache_dir is not False:
        cpath = Path(cache_dir or default_cache_dir()) / f"{_cache_key(data, tok, key_fmt, max_seq_len)}.npz"
        if cpath.exists():
            hit = _cache_load(cpath, name)
            if hit is not None:
                return hit
    res = read_jsonl(data, name, tok, fmt, max_seq_len) if jsonl else read_text(data, name, tok, max_seq_len)
    if cpath is not None:
        _cache_save(cpath, res)
    return res


def list_files(root: Path, glob: str | None) -> list[Path]:
    """Files under root matching glob (default every file), hidden files and folders skipped, sorted."""
    pats = [g.strip() for g in (glob or "**/*").split(",") if g.strip()]
    out = set()
    for pat in pats:
        for p in root.glob(pat):
            rel = p.relative_to(root).parts
            if p.is_file() and not any(part.startswith(".") for part in rel):
                out.add(p)
    return sorted(out)


def read_source(source, tok, fmt="auto", glob=None, max_seq_len=512, cache_dir=None) -> FileResult:
    """A file (JSONL by suffix, else plain text) or a folder of files (each a document)."""
    p = Path(source).expanduser()
    if not p.exists():
        raise DatasetError(f"{p}: no such file or folder; give a .jsonl file, a text file or a folder")
    if p.is_file():
        return read_file(p, tok, fmt, max_seq_len, cache_dir)
    files = list_files(p, glob)
    if not files:
        raise DatasetError(f"{p}: no files match {glob or '**/*'}; check the folder or the glob")
    out = FileResult(format="text")
    fmts = set()
    for f in files:
        r = read_file(f, tok, fmt if f.suffix.lower() in JSONL_SUFFIXES else "auto", max_seq_len, cache_dir)
        out.examples += r.examples
        out.problems += r.problems
        fmts.add(r.format)
    out.format = fmts.pop() if len(fmts) == 1 else "mixed"
    return out
