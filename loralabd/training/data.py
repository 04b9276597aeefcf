"""Datasets: text files and folders, JSONL (text | prompt/completion | messages), validation split,
on-disk tokenization cache, inspection with line-numbered problems.

Every example becomes (ids, mask): mask[t] says whether predicting ids[t] counts in the loss
(completion / assistant tokens only, where the format has them). Packing is in packing.py.
Nothing is dropped silently: every line that is skipped or truncated is a Problem with its line number.

Files are streamed, never read whole: line by line, each line at most MAX_RECORD_BYTES (a longer one is
skipped in chunks, without holding it, and reported), within MAX_FILE_BYTES a file and MAX_TOTAL_BYTES a
folder (docs/training.md states these limits).
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import os
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import LoraLabError
from ..paths import atomic_write_bytes

FORMATS = ("auto", "text", "completion", "chat")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")  # .json: JSONL, or one array of records (numbered from 1)
CACHE_VERSION = 1
MIB = 1 << 20
MAX_FILE_BYTES = 256 * MIB  # one dataset file
MAX_TOTAL_BYTES = 1024 * MIB  # every file of a dataset folder together
MAX_RECORD_BYTES = 1 * MIB  # one line: a JSONL record, or a line of a text file
MAX_ARRAY_BYTES = 32 * MIB  # a .json file holding one JSON array is parsed whole
TEXT_BLOCK = 4 * MIB  # a text file is tokenized in blocks of about this many characters (whole when smaller)
REPORT_BYTES = 1 * MIB  # progress is told at most once per this many bytes read


class DatasetError(LoraLabError):
    """The dataset cannot be used at all (no file, no usable example); the message says what to fix."""


@dataclass
class Problem:
    file: str
    line: int | None  # 1-based; None for a whole file
    kind: str  # bad_json | missing_field | bad_field | empty | too_long | too_big | no_target | template | not_text | blank_line
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


class ReadProgress:
    """Bytes read of a dataset so far, told to report(done, total) at most once per REPORT_BYTES."""

    def __init__(self, total: int, report: Callable[[int, int], None] | None = None):
        self.total, self.report = total, report
        self.done = self.told = 0

    def add(self, n: int) -> None:
        self.done += n
        if self.report is not None and self.done - self.told >= REPORT_BYTES:
            self.told = self.done
            self.report(self.done, self.total)


def _mib(n: int) -> str:
    return f"{n / MIB:.1f} MiB"


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


def _cache_key(path: Path, tok, fmt: str, max_seq_len: int) -> str:
    """The file's contents (hashed in chunks, never held whole) and how they are tokenized."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MIB):
            h.update(chunk)
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


def _lines(f: BinaryIO, prog: ReadProgress) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number from 1, the line's bytes with its newline, its length). A line over MAX_RECORD_BYTES comes as
    None: it is read past in chunks, never held."""
    ln = 0
    while b := f.readline(MAX_RECORD_BYTES + 1):
        ln += 1
        n = len(b)
        if len(b) > MAX_RECORD_BYTES and not b.endswith(b"\n"):
            while more := f.readline(MIB):
                n += len(more)
                if more.endswith(b"\n"):
                    break
            prog.add(n)
            yield ln, None, n
            continue
        prog.add(n)
        yield ln, b, n


def _too_big_line(n: int) -> str:
    return (f"a line of {_mib(n)} is over the limit of {_mib(MAX_RECORD_BYTES)} for one line; it is skipped — "
            "split it into shorter records")


def _starts_array(f: BinaryIO) -> bool:
    head = f.read(4096)
    f.seek(0)
    return head.removeprefix(codecs.BOM_UTF8).lstrip().startswith(b"[")


def _json_records(f: BinaryIO, size: int, name: str, res: FileResult,
                  prog: ReadProgress) -> Iterator[tuple[int, str | None, int]]:
    """(line number, the record's JSON text, its length) of a JSONL file, or of a file holding one JSON array
    (numbered by record from 1, parsed whole: at most MAX_ARRAY_BYTES). Whole-file problems go to res."""
    if _starts_array(f):
        if size > MAX_ARRAY_BYTES:
            res.problems.append(Problem(name, None, "too_big", f"a JSON array of {_mib(size)} is over the limit of "
                                        f"{_mib(MAX_ARRAY_BYTES)}; write it as JSONL (one record per line), which "
                                        "is read line by line"))
            return
        data = f.read()
        prog.add(len(data))
        try:
            arr = json.loads(data.decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            res.problems.append(Problem(name, None, "not_text", f"not UTF-8 ({e}); save the file as UTF-8"))
            return
        except json.JSONDecodeError as e:
            res.problems.append(Problem(name, e.lineno, "bad_json", f"not valid JSON ({e.msg} at column {e.colno}); "
                                        "fix it, or write one JSON object per line (JSONL)"))
            return
        for i, x in enumerate(arr, 1):  # a list: the text starts with "["
            yield i, json.dumps(x), 0
        return
    for ln, raw, n in _lines(f, prog):
        if raw is None:
            yield ln, None, n
            continue
        try:
            text = raw.decode("utf-8-sig" if ln == 1 else "utf-8")
        except UnicodeDecodeError as e:
            res.examples.clear()
            res.problems[:] = [Problem(name, None, "not_text", f"not UTF-8 (line {ln}: {e}); save the file as UTF-8")]
            return
        yield ln, text.removesuffix("\n"), n


def read_jsonl(records: Iterable[tuple[int, str | None, int]], res: FileResult, name: str, tok, fmt: str,
               max_seq_len: int) -> FileResult:
    """Examples of JSON records (line number, text or None for a line too long to read, its length) into res."""
    for ln, raw, nbytes in records:
        P = lambda kind, msg: res.problems.append(Problem(name, ln, kind, msg))  # noqa: E731
        if raw is None:
            P("too_big", _too_big_line(nbytes))
            continue
        if not raw.strip():
            P("blank_line", "blank line skipped")
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            P("bad_json", f"not valid JSON ({e.msg} at column {e.colno}); fix or remove this line")
            continue
        except RecursionError:
            P("bad_json", "nested too deeply to read; fix or remove this line")
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
        except TypeError:  # the tokenizer takes Unicode text only; JSON's \u escapes can spell lone surrogates
            P("bad_field", "holds text that is not valid Unicode (a lone surrogate such as \\ud800); fix the record")
            continue
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


def read_text(f: BinaryIO, size: int, name: str, tok, max_seq_len: int, prog: ReadProgress) -> FileResult:
    """A plain-text document, cut into chunks of max_seq_len tokens (each chunk one example). Read line by line;
    a file up to TEXT_BLOCK is tokenized whole, a bigger one in blocks of whole lines."""
    res = FileResult(format="text")
    if b"\x00" in f.read(8192):
        res.problems.append(Problem(name, None, "not_text", "binary file skipped; narrow the glob to text files"))
        return res
    f.seek(0)
    dec = codecs.getincrementaldecoder("utf-8-sig")()
    parts: list[list[int]] = []
    block: list[str] = []
    chars, blank = 0, True
    try:
        for ln, raw, n in _lines(f, prog):
            if raw is None:
                res.problems.append(Problem(name, ln, "too_big", _too_big_line(n) + "; the file is skipped"))
                return res
            line = dec.decode(raw)
            blank = blank and not line.strip()
            block.append(line)
            chars += len(line)
            if chars >= TEXT_BLOCK and size > TEXT_BLOCK:
                parts.append(tok.encode("".join(block), add_bos=None if not parts else False))
                block, chars = [], 0
        block.append(dec.decode(b"", final=True))
    except UnicodeDecodeError as e:
        res.problems.append(Problem(name, None, "not_text", f"not UTF-8 ({e}); skipped — save it as UTF-8"))
        return res
    if blank:
        res.problems.append(Problem(name, None, "empty", "empty file skipped"))
        return res
    if parts:  # blocks: the last one, then the end of text
        parts.append(tok.encode("".join(block), add_bos=False) + _eos(tok))
        ids = np.asarray([i for p in parts for i in p], np.int32)
        mask = np.ones(len(ids), bool)
    else:
        ids, mask = encode_text(tok, "".join(block))
    for s in range(0, len(ids), max_seq_len):
        if len(ids) - s >= 2:
            res.examples.append(Example(ids[s:s + max_seq_len], mask[s:s + max_seq_len], name, None))
    return res


def read_file(path: Path, tok, fmt: str = "auto", max_seq_len: int = 512, cache_dir=None,
              name: str | None = None, progress: ReadProgress | None = None) -> FileResult:
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    name = name or str(path)
    prog = progress or ReadProgress(0)
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        prog.add(size)
        return FileResult(problems=[Problem(name, None, "too_big", f"{_mib(size)} is over the limit of "
                                            f"{_mib(MAX_FILE_BYTES)} for one dataset file; split it into several "
                                            "files in a folder, or train on a part of it")])
    jsonl = path.suffix.lower() in JSONL_SUFFIXES or fmt != "auto"
    key_fmt = fmt if jsonl else "plain"
    cpath = None
    if cache_dir is not False:
        cpath = Path(cache_dir or default_cache_dir()) / f"{_cache_key(path, tok, key_fmt, max_seq_len)}.npz"
        if cpath.exists():
            hit = _cache_load(cpath, name)
            if hit is not None:
                prog.add(size)
                return hit
    with open(path, "rb") as f:
        if jsonl:
            res = FileResult(format=fmt)
            res = read_jsonl(_json_records(f, size, name, res, prog), res, name, tok, fmt, max_seq_len)
        else:
            res = read_text(f, size, name, tok, max_seq_len, prog)
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


def read_source(source, tok, fmt="auto", glob=None, max_seq_len=512, cache_dir=None,
                progress: Callable[[int, int], None] | None = None) -> FileResult:
    """A file (JSONL by suffix, else plain text) or a folder of files (each a document). progress(done, total)
    hears the bytes read so far, about once per REPORT_BYTES."""
    p = Path(source).expanduser()
    if not p.exists():
        raise DatasetError(f"{p}: no such file or folder; give a .jsonl file, a text file or a folder")
    if p.is_file():
        return read_file(p, tok, fmt, max_seq_len, cache_dir, progress=ReadProgress(p.stat().st_size, progress))
    files = list_files(p, glob)
    if not files:
        raise DatasetError(f"{p}: no files match {glob or '**/*'}; check the folder or the glob")
    total = sum(f.stat().st_size for f in files)
    if total > MAX_TOTAL_BYTES:
        raise DatasetError(f"{p}: the {len(files)} files matching {glob or '**/*'} hold {_mib(total)}, over the limit "
                           f"of {_mib(MAX_TOTAL_BYTES)} for one dataset; narrow the glob or train on a part")
    prog = ReadProgress(total, progress)
    out = FileResult(format="text")
    fmts = set()
    for f in files:
        r = read_file(f, tok, fmt if f.suffix.lower() in JSONL_SUFFIXES else "auto", max_seq_len, cache_dir,
                      progress=prog)
        out.examples += r.examples
        out.problems += r.problems
        fmts.add(r.format)
    out.format = fmts.pop() if len(fmts) == 1 else "mixed"
    return out
