"""How fast are `prepare` and the loader, relative to just reading the same bytes? Prints a table, writes JSON.

Run: PYTHONPATH=src .venv/bin/python benchmarks/data_pipeline.py
Baselines measured in the same run: reading the demo files (prepare's floor) and slicing the
same windows out of the memmap without packing (the loader's floor).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import torch

from feixing.config.schema import DataConfig
from feixing.data import DEMO_MAX_BYTES, build_loader, demo_corpus_paths, prepare
from feixing.data.packing import open_dataset


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> None:
    torch.set_num_threads(1)
    rows, res = [], {}
    tmp = tempfile.mkdtemp(prefix="fx-bench-data-")
    paths = demo_corpus_paths()

    def read_files():
        n = 0
        for p in paths:
            with open(p, "rb") as f:
                n += len(f.read())
            if n >= DEMO_MAX_BYTES:
                return n
        return n

    read_files()  # warm the page cache so both sides read from memory
    t_read, nbytes = timed(read_files)
    out = os.path.join(tmp, "byte")
    t_byte, s = timed(lambda: prepare(paths, out, "byte", progress=False, max_bytes=DEMO_MAX_BYTES))
    rows.append(("prepare demo, byte tokenizer", t_byte, t_read, s["tokens"]))

    # A real BPE (vocab 4096) trained here on the first 1 MB of the corpus: no download.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    texts, n = [], 0
    for p in paths:
        with open(p, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
        n += len(texts[-1])
        if n > 1_000_000:
            break
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4096,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tj = os.path.join(tmp, "tokenizer.json")
    tok.save(tj)
    out_bpe = os.path.join(tmp, "bpe")
    t_bpe, s_bpe = timed(
        lambda: prepare(paths, out_bpe, tj, progress=False, max_bytes=DEMO_MAX_BYTES)
    )
    rows.append(("prepare demo, BPE-4096 tokenizer", t_bpe, t_read, s_bpe["tokens"]))

    # Loader: the demo's data config (seq 256, global batch 16, 4 dp ranks), rank 0.
    cfg = DataConfig(path=out, seq_len=256, batch_size=16, grad_accum_steps=1)
    ld = build_loader(cfg, 0, 4, seed=0)
    steps = 300
    ld.next_batch()
    t_load, _ = timed(lambda: [ld.next_batch() for _ in range(steps)])
    data = open_dataset(out)
    ids = ld.stream_sample_ids(0, steps * ld.local_batch_size)

    def raw():
        for k in range(steps):
            chunk = ids[k * 4 : (k + 1) * 4]
            torch.from_numpy(np.stack([data.read(int(i) * 256, int(i) * 256 + 257) for i in chunk]))

    t_raw, _ = timed(raw)
    rows.append(("loader next_batch x300 (demo cfg)", t_load, t_raw, steps * 4 * 256))

    # Resume: a fresh loader + load_state_dict + first batch, against one steady batch.
    state = ld.state_dict()

    def resume():
        fresh = build_loader(cfg, 0, 4, seed=0)
        fresh.load_state_dict(state)
        fresh.next_batch()

    t_resume, _ = timed(resume)
    t_steady = t_load / steps
    rows.append(("build+resume+first batch vs 1 step", t_resume, t_steady, 4 * 256))

    print(f"{'case':38s} {'time s':>9s} {'baseline s':>11s} {'ratio':>7s} {'tokens':>10s}")
    for name, t, base, ntok in rows:
        print(f"{name:38s} {t:9.4f} {base:11.4f} {t / base:7.1f} {ntok:10d}")
        res[name] = {"seconds": t, "baseline_seconds": base, "ratio": t / base, "tokens": ntok}
    res["_meta"] = {
        "bytes": nbytes,
        "byte_tokens_per_s": s["tokens"] / t_byte,
        "bpe_tokens_per_s": s_bpe["tokens"] / t_bpe,
        "loader_steps_per_s": steps / t_load,
        "python": sys.version.split()[0],
    }
    print(json.dumps(res["_meta"]))
    os.makedirs("benchmarks/results", exist_ok=True)
    with open("benchmarks/results/data_pipeline.json", "w") as f:
        json.dump(res, f, indent=1)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
