"""Atomic commit of a checkpoint folder: names, fsync, manifest (written last), verify, retention.

Standard library only: the background writer process imports this module without torch.

On disk, under `<run.dir>/checkpoints/`:

    step-00000100/            committed: has a valid manifest.json
        rank-00000.safetensors  this rank's tensors (its shards, plus replicated tensors on rank 0)
        rank-00000.json         this rank's index: where every tensor chunk lies, non-tensor state
        ...
        manifest.json           written last, then the folder is renamed into place in one step
    .tmp-step-00000200-<id>/  a save in progress (or interrupted): never loaded, removed at start
    corrupt-step-00000300-<id>/  a committed checkpoint that failed verification (kept to inspect)
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time

FORMAT = "feixing-checkpoint/1"
MANIFEST = "manifest.json"
_STEP_RE = re.compile(r"^step-(\d{8,})$")
_CHUNK = 16 << 20  # bytes per read/write call: large enough for full disk speed, small for memory


class CheckpointError(RuntimeError):
    """A checkpoint could not be written, committed or loaded; the message names the file and fix."""


class CheckpointInvalid(CheckpointError):
    """A checkpoint folder failed verification (missing/corrupt manifest, wrong size or checksum)."""


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def temp_dirname(step: int, token: str) -> str:
    return f".tmp-step-{step:08d}-{token}"


def rank_stem(rank: int) -> str:
    return f"rank-{rank:05d}"


def fsync_dir(path: str) -> None:
    """Make a rename or a new entry in `path` durable (POSIX needs an fsync of the folder)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str, data: bytes) -> None:
    """Write `data` to `path` via a temporary name, fsync, rename: readers never see a partial file."""
    part = path + ".part"
    with open(part, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            block = f.read(_CHUNK)
            if not block:
                return h.hexdigest()
            h.update(block)


def _body_digest(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(folder: str, body: dict) -> None:
    """Write manifest.json (its own sha256 inside, so a flipped byte in it is detected too)."""
    doc = {"body": body, "sha256": _body_digest(body)}
    write_durable(os.path.join(folder, MANIFEST), json.dumps(doc, indent=1, sort_keys=True).encode())


def read_manifest(folder: str) -> dict:
    """Return the manifest body of a checkpoint folder or raise CheckpointInvalid saying why."""
    path = os.path.join(folder, MANIFEST)
    try:
        with open(path, "rb") as f:
            doc = json.loads(f.read())
    except FileNotFoundError:
        raise CheckpointInvalid(f"{folder}: no {MANIFEST} (the save never committed)") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointInvalid(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or "body" not in doc or doc.get("sha256") != _body_digest(doc["body"]):
        raise CheckpointInvalid(f"{path}: manifest checksum mismatch (corrupted manifest)")
    body = doc["body"]
    if body.get("format") != FORMAT:
        raise CheckpointInvalid(f"{path}: format {body.get('format')!r}, expected {FORMAT!r}")
    return body


def verify(folder: str, check_sha256: bool, only: list[str] | None = None) -> dict:
    """Check every file listed in the manifest: size always, sha256 if asked. Returns the manifest.

    `only` restricts the checksum pass to some files (ranks split the reading between them).
    """
    body = read_manifest(folder)
    for name, info in sorted(body["files"].items()):
        path = os.path.join(folder, name)
        try:
            size = os.stat(path).st_size
        except FileNotFoundError:
            raise CheckpointInvalid(f"{path}: listed in the manifest but missing") from None
        if size != info["size"]:
            raise CheckpointInvalid(f"{path}: {size} bytes, manifest says {info['size']} (truncated?)")
        if check_sha256 and (only is None or name in only):
            digest = sha256_file(path)
            if digest != info["sha256"]:
                raise CheckpointInvalid(f"{path}: sha256 {digest[:12]}.. != manifest "
                                        f"{info['sha256'][:12]}.. (corrupted file)")
    return body


def list_committed(root: str) -> list[tuple[int, str]]:
    """(step, folder) of every `step-*` folder with a manifest file, newest step first."""
    out = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    for name in names:
        m = _STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, MANIFEST)):
            out.append((int(m.group(1)), os.path.join(root, name)))
    return sorted(out, reverse=True)


def remove_stale_temps(root: str, keep_token: str | None = None) -> list[str]:
    """Delete `.tmp-*` folders left by interrupted saves (those not of the current attempt)."""
    removed = []
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith(".tmp-") and not (keep_token and name.endswith("-" + keep_token)):
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
            removed.append(name)
    return removed


def quarantine(root: str, folder: str, token: str) -> str:
    """Rename an invalid committed checkpoint so `--resume auto` and retention skip it."""
    dest = os.path.join(root, "corrupt-" + os.path.basename(folder) + "-" + token)
    os.replace(folder, dest)
    return dest


def select_prunable(steps: list[int], newest: int, keep: int, keep_every: int) -> list[int]:
    """Steps to delete: all but the `keep` newest up to `newest`, those divisible by `keep_every`.

    `newest` (the checkpoint just committed) is never pruned; steps above it belong to an older
    timeline the user resumed away from (`--resume PATH`) and are left alone.
    """
    older = sorted((s for s in steps if s <= newest), reverse=True)
    kept = set(older[: max(keep, 1)]) | {newest}
    if keep_every > 0:
        kept |= {s for s in older if s % keep_every == 0}
    return [s for s in older if s not in kept]


def wait_for_ranks(folder: str, world_size: int, timeout_s: float) -> None:
    """Block until every rank's index file exists in `folder`; fail fast on an error marker.

    This replaces a collective: rank 0's writer commits only when all ranks' files are present,
    so a rank that died or failed makes the commit fail after `timeout_s`, never hang a collective.
    """
    deadline = time.monotonic() + timeout_s
    pause = 0.02
    while True:
        names = set(os.listdir(folder))
        for name in sorted(names):
            if name.endswith(".error"):
                with open(os.path.join(folder, name), errors="replace") as f:
                    raise CheckpointError(f"{name[:-6]} failed to write its part: {f.read().strip()}")
        missing = [r for r in range(world_size) if rank_stem(r) + ".json" not in names]
        if not missing:
            return
        if time.monotonic() > deadline:
            raise CheckpointError(f"ranks {missing} did not write their part of {folder} within "
                                  f"{timeout_s:.0f} s (checkpoint.commit_timeout_s); not committed")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.5)


def commit(root: str, tmp: str, step: int, world_size: int, meta: dict, timeout_s: float) -> str:
    """Rank 0: wait for all ranks, write the manifest last, rename `tmp` to `step-N` atomically."""
    wait_for_ranks(tmp, world_size, timeout_s)
    files = {}
    for r in range(world_size):
        stem = rank_stem(r)
        index_path = os.path.join(tmp, stem + ".json")
        with open(index_path, "rb") as f:
            raw = f.read()
        index = json.loads(raw)
        files[stem + ".json"] = {"size": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}
        data = stem + ".safetensors"
        size = os.stat(os.path.join(tmp, data)).st_size
        if size != index["size"]:
            raise CheckpointError(f"{tmp}/{data}: {size} bytes on disk, rank {r} wrote {index['size']}")
        files[data] = {"size": index["size"], "sha256": index["sha256"]}
    body = dict(meta, format=FORMAT, step=step, world_size=world_size, files=files,
                created_unix=time.time())
    write_manifest(tmp, body)
    fsync_dir(tmp)
    final = os.path.join(root, step_dirname(step))
    if os.path.exists(final):
        # Same step saved again (resumed from an earlier one): move the old one aside first.
        old = os.path.join(root, f".tmp-replaced-{os.path.basename(tmp)}")
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    fsync_dir(root)
    return final


def prune(root: str, newest: int, keep: int, keep_every: int) -> list[str]:
    """Apply retention after committing `newest`; returns the removed folder names."""
    committed = {s: p for s, p in list_committed(root)}
    removed = []
    for s in select_prunable(list(committed), newest, keep, keep_every):
        # Rename first so a crash mid-delete leaves a `.tmp-` folder, not a half checkpoint.
        doomed = os.path.join(root, f".tmp-pruned-{step_dirname(s)}")
        os.replace(committed[s], doomed)
        shutil.rmtree(doomed, ignore_errors=True)
        removed.append(step_dirname(s))
    return removed
