"""Text -> token shards: `prepare` turns text/jsonl files and folders into the on-disk format below.

On-disk layout of a dataset folder (written into a hidden temporary folder, then renamed, so
an interrupted prepare never leaves a folder that looks complete):

    tokens-00000.bin   raw token ids, uint16 (vocab <= 65536) or uint32, read with np.memmap
    docs-00000.npy     int64 start offset of every document inside that shard, plus the
                       shard's token count as a last entry (so doc i is [d[i], d[i+1]))
    meta.json          written last: tokenizer, vocab size, eos id, dtype, counts, sources,
                       per-shard token counts and a fingerprint of the token content

Every document is encoded without special tokens and ends with the tokenizer's eos id.
Documents never span shards. `packing.open_dataset` reads this format.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time

import numpy as np

from feixing.data.tokenizer import build_tokenizer

FORMAT_VERSION = 1
META_FILE = "meta.json"
DEMO_MAX_BYTES = 8_000_000
"""Demo corpus cap: ~8 MB of stdlib source = ~8 M byte tokens, a few seconds to prepare."""
SHARD_TOKENS = 1 << 28
"""Start a new shard (at a document boundary) once a shard holds this many tokens (512 MiB uint16)."""

_SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", "test", "tests", "idle_test"}
_ENCODE_BATCH_BYTES = 1 << 20  # HF encode_batch chunk: big enough to use its threads, small in RAM


def prepare_hint(out_dir: str) -> str:
    return f"run `feixing prepare INPUT... --out {out_dir}` first"


# ----------------------------------------------------------------------------- inputs


def _walk(folder: str, exclude: str) -> list[str]:
    """Every file under `folder`: a folder's files (sorted) before its subfolders (sorted).

    Hidden entries, __pycache__ and `exclude` (the output folder, which may sit inside an
    input folder and would otherwise be read back as text on the next run) are skipped.
    """
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".")
            and d != "__pycache__"
            and os.path.abspath(os.path.join(dirpath, d)) != exclude
        )
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith("."))
    return out


def _list_files(inputs: list[str], exclude: str) -> list[str]:
    if isinstance(inputs, str):
        inputs = [inputs]
    if not inputs:
        raise ValueError("prepare needs at least one input file or folder")
    files: list[str] = []
    for p in inputs:
        if os.path.isdir(p):
            files.extend(_walk(p, exclude))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise FileNotFoundError(
                f"prepare input {p!r} does not exist (expected a text or .jsonl file, or a folder)"
            )
    return files


def _documents(path: str):
    """Yield the texts of one input file; (None) once if the file is binary and skipped."""
    if path.endswith(".jsonl"):
        with open(path, encoding="utf-8", errors="replace") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except ValueError as e:
                    raise ValueError(
                        f"{path}:{lineno}: not valid JSON ({e}); each line of a .jsonl input "
                        "must be an object with a 'text' field"
                    ) from None
                if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                    raise TypeError(
                        f"{path}:{lineno}: expected an object with a string 'text' field, got {str(rec)[:80]!r}"
                    )
                yield rec["text"]
        return
    with open(path, "rb") as f:
        raw = f.read()
    if b"\0" in raw[:8192]:  # NUL bytes: an image, archive or compiled file, not text
        yield None
        return
    yield raw.decode("utf-8", errors="replace")


def _sources_fingerprint(files: list[str], tokenizer_fp: str, max_bytes: int | None) -> str:
    h = hashlib.sha256(json.dumps([tokenizer_fp, max_bytes, FORMAT_VERSION]).encode())
    for p in files:
        st = os.stat(p)
        h.update(f"{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------- progress


class _Progress:
    """One-line progress on stderr: files, files/s, tokens, ETA (from bytes left)."""

    def __init__(self, total_files: int, total_bytes: int, enabled: bool):
        self.total_files, self.total_bytes, self.enabled = total_files, max(total_bytes, 1), enabled
        self.tty = sys.stderr.isatty()
        self.t0 = self.last = time.perf_counter()

    def update(self, files: int, nbytes: int, tokens: int, final: bool = False, note="") -> None:
        now = time.perf_counter()
        # A tty redraws in place 5x/s; a log file gets a line every 5 s so it stays readable.
        if not self.enabled or (not final and now - self.last < (0.2 if self.tty else 5.0)):
            return
        self.last = now
        dt = max(now - self.t0, 1e-9)
        eta = (self.total_bytes - min(nbytes, self.total_bytes)) / max(nbytes / dt, 1.0)
        line = (
            f"prepare {files}/{self.total_files} files  {files / dt:.1f} files/s  "
            f"{tokens / 1e6:.2f}M tokens  {nbytes / 1e6:.1f} MB  "
            f"{'done in ' + _hms(dt) if final else 'ETA ' + _hms(eta)}{note}"
        )
        end = "\n" if final or not self.tty else ""
        sys.stderr.write(("\r" if self.tty else "") + line + end)
        sys.stderr.flush()


def _hms(s: float) -> str:
    s = int(s + 0.5)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------- writer


class _ShardWriter:
    def __init__(self, folder: str, dtype, shard_tokens: int):
        self.folder, self.dtype, self.shard_tokens = folder, np.dtype(dtype), shard_tokens
        self.sha = hashlib.sha256()
        self.shard_sizes: list[int] = []
        self.f = None
        self.starts: list[int] = []
        self.n = 0  # tokens in the open shard
        self.total = 0
        self.docs = 0

    def add(self, ids: list[int] | np.ndarray, eos: int) -> None:
        arr = np.empty(len(ids) + 1, dtype=self.dtype)
        arr[:-1] = ids
        arr[-1] = eos
        if self.f is not None and self.n >= self.shard_tokens:
            self._close_shard()
        if self.f is None:
            name = f"tokens-{len(self.shard_sizes):05d}.bin"
            # Stays open across add() calls until the shard is full: no context manager.
            self.f = open(os.path.join(self.folder, name), "wb")  # noqa: SIM115
        self.starts.append(self.n)
        data = arr.tobytes()
        self.f.write(data)
        self.sha.update(data)
        self.n += len(arr)
        self.total += len(arr)
        self.docs += 1

    def _close_shard(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        self.f = None
        offsets = np.asarray(self.starts + [self.n], dtype=np.int64)
        with open(os.path.join(self.folder, f"docs-{len(self.shard_sizes):05d}.npy"), "wb") as f:
            np.save(f, offsets)
            f.flush()
            os.fsync(f.fileno())
        self.shard_sizes.append(self.n)
        self.starts, self.n = [], 0

    def finish(self) -> None:
        if self.f is not None:
            self._close_shard()


def prepare(
    inputs: list[str],
    out_dir: str,
    tokenizer_spec: str,
    progress: bool = True,
    max_bytes: int | None = None,
    *,
    reuse: bool = False,
    shard_tokens: int = SHARD_TOKENS,
) -> dict:
    """Tokenize `inputs` (text files, .jsonl with a 'text' field, folders) into shards in `out_dir`.

    Each text file (or jsonl line) is one document; empty documents and binary files (NUL in the
    first 8 KiB) are skipped. `max_bytes` stops after the document that reaches that many bytes
    of text. `reuse=True` returns the existing dataset untouched when it was made from the same
    files (paths, sizes, mtimes), tokenizer and cap. Returns a summary dict (also in meta.json).
    """
    t0 = time.perf_counter()
    tok = build_tokenizer(tokenizer_spec)
    files = _list_files(inputs, os.path.abspath(out_dir))
    if not files:
        raise ValueError(f"prepare found no files in {list(inputs)}")
    sources_fp = _sources_fingerprint(files, tok.fingerprint(), max_bytes)
    meta_path = os.path.join(out_dir, META_FILE)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise FileExistsError(f"prepare output {out_dir!r} is a file; choose another --out")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not os.path.isfile(meta_path):
        raise FileExistsError(
            f"prepare output {out_dir!r} exists and is not a feixing dataset (no {META_FILE}); "
            "choose another --out or remove that folder"
        )
    if reuse and os.path.isfile(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old.get("sources_fingerprint") == sources_fp:
            return {**old["summary"], "reused": True, "seconds": time.perf_counter() - t0}

    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(os.path.abspath(out_dir))
    _remove_stale_tmp(parent, base)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-{os.getpid()}-", dir=parent)
    try:
        summary = _write(files, tmp, tok, dtype, progress, max_bytes, shard_tokens)
        summary.update(out_dir=os.path.abspath(out_dir), reused=False)
        meta = {
            "format_version": FORMAT_VERSION,
            "tokenizer": tokenizer_spec,
            "tokenizer_name": tok.name,
            "tokenizer_fingerprint": tok.fingerprint(),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "dtype": np.dtype(dtype).name,
            "num_tokens": summary["tokens"],
            "num_documents": summary["documents"],
            "shard_tokens": summary.pop("shard_sizes"),
            "content_sha256": summary.pop("content_sha256"),
            "sources_fingerprint": sources_fp,
            "max_bytes": max_bytes,
            "sources": summary.pop("sources"),
        }
        summary["seconds"] = round(time.perf_counter() - t0, 3)
        meta["summary"] = summary
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _swap_in(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _write(files, folder, tok, dtype, progress, max_bytes, shard_tokens) -> dict:
    total_bytes = sum(os.path.getsize(p) for p in files)
    bar = _Progress(len(files), min(total_bytes, max_bytes or total_bytes), progress)
    writer = _ShardWriter(folder, dtype, shard_tokens)
    batch: list[str] = []
    batch_bytes = 0
    nbytes = 0
    skipped: list[str] = []
    sources: list[str] = []

    def flush() -> None:
        nonlocal batch, batch_bytes
        if not batch:
            return
        encoded = tok.encode_batch(batch) if hasattr(tok, "encode_batch") else None
        for i, text in enumerate(batch):
            if encoded is not None:
                ids = encoded[i]
            else:  # byte tokenizer: the UTF-8 bytes are the ids
                ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
            writer.add(ids, tok.eos_id)
        batch, batch_bytes = [], 0

    done = 0
    for done, path in enumerate(files, 1):
        used = False
        for text in _documents(path):
            if text is None:
                skipped.append(path)
                break
            if not text:
                continue
            used = True
            n = len(text.encode("utf-8"))
            batch.append(text)
            batch_bytes += n
            nbytes += n
            if batch_bytes >= _ENCODE_BATCH_BYTES:
                flush()
            if max_bytes is not None and nbytes >= max_bytes:
                break
        if used:
            sources.append(os.path.abspath(path))
        bar.update(done, nbytes, writer.total)
        if max_bytes is not None and nbytes >= max_bytes:
            break
    flush()
    writer.finish()
    capped = max_bytes is not None and nbytes >= max_bytes
    bar.update(
        done, nbytes, writer.total, final=True, note=" (max_bytes reached)" if capped else ""
    )
    if writer.docs == 0:
        raise ValueError(
            f"prepare found no text in {len(files)} file(s) (all empty or binary; skipped "
            f"{len(skipped)} binary); give text, .jsonl (with a 'text' field) or folders of text"
        )
    return {
        "files": len(sources),
        "skipped_binary_files": len(skipped),
        "documents": writer.docs,
        "tokens": writer.total,
        "bytes": nbytes,
        "shards": len(writer.shard_sizes),
        "dtype": np.dtype(dtype).name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer": tok.name,
        "shard_sizes": writer.shard_sizes,
        "content_sha256": writer.sha.hexdigest(),
        "sources": sources,
    }


def _remove_stale_tmp(parent: str, base: str) -> None:
    """Delete temporary folders left by a prepare of `base` that was killed (its pid is gone)."""
    prefix = f".{base}.tmp-"
    for name in os.listdir(parent):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("-", 1)[0].split(".", 1)[0]
        try:
            os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
        except ProcessLookupError:
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
        except (ValueError, PermissionError):  # not our naming, or another user's live process
            continue


def _swap_in(tmp: str, out_dir: str) -> None:
    """Replace `out_dir` by `tmp` with renames; a reader sees the old dataset, none, or the new one."""
    if os.path.isdir(out_dir):
        old = tmp + ".old"
        os.rename(out_dir, old)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            os.rename(old, out_dir)  # put the previous dataset back before reporting
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_dir)


def demo_corpus_paths() -> list[str]:
    """The running interpreter's standard-library .py files (sorted), without tests and site-packages."""
    root = sysconfig.get_paths()["stdlib"]
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    if not out:
        raise FileNotFoundError(
            f"no .py files under the standard library folder {root!r}; pass INPUT paths to prepare instead"
        )
    return out
