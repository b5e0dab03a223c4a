"""prepare: text/jsonl/folder inputs -> shards with exact document boundaries; atomicity; errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from feixing.data.packing import open_dataset
from feixing.data.prepare import demo_corpus_paths, prepare
from feixing.data.tokenizer import build_tokenizer
from tests.unit.test_data_tokenizer import make_bpe


def make_inputs(tmp_path):
    """A text file, a jsonl file and a folder (with a nested folder, an empty and a binary file)."""
    (tmp_path / "a.txt").write_text("first document\n")
    recs = [{"text": "jsonl one"}, {"text": ""}, {"text": "jsonl two ü"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "z.py").write_text("print('z')\n")
    (folder / "sub" / "m.md").write_text("# nested\n")
    (folder / "empty.txt").write_text("")
    (folder / "blob.bin").write_bytes(b"\x89PNG\x00\x00\x01")
    (folder / ".hidden").write_text("never read")
    # expected order: inputs as given; in a folder its files (sorted), then its subfolders
    docs = ["first document\n", "jsonl one", "jsonl two ü", "print('z')\n", "# nested\n"]
    return [str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl"), str(folder)], docs


def documents_of(data) -> list[np.ndarray]:
    ends = list(data.doc_starts[1:]) + [data.num_tokens]
    return [data.read(int(s), int(e)) for s, e in zip(data.doc_starts, ends)]


def test_text_jsonl_folder_boundaries(tmp_path):
    inputs, docs = make_inputs(tmp_path)
    s = prepare(inputs, str(tmp_path / "out"), "byte", progress=False)
    tok = build_tokenizer("byte")
    expect = [tok.encode(d) + [tok.eos_id] for d in docs]
    assert s["documents"] == len(docs) and s["skipped_binary_files"] == 1
    assert s["tokens"] == sum(map(len, expect)) and s["dtype"] == "uint16"
    data = open_dataset(str(tmp_path / "out"))
    assert [d.tolist() for d in documents_of(data)] == expect
    meta = data.meta
    assert (meta["tokenizer"], meta["vocab_size"], meta["eos_id"]) == ("byte", 258, 256)
    assert meta["num_documents"] == len(docs) and meta["num_tokens"] == s["tokens"]
    assert len(meta["sources"]) == 4  # a.txt, b.jsonl, z.py, m.md (empty and binary dropped)
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_hf_tokenizer_and_multiple_shards(tmp_path):
    tj = make_bpe(tmp_path / "tokenizer.json")
    inputs, docs = make_inputs(tmp_path)
    prepare(inputs, str(tmp_path / "out"), tj, progress=False, shard_tokens=8)
    data = open_dataset(str(tmp_path / "out"))
    tok = build_tokenizer(tj)
    assert [d.tolist() for d in documents_of(data)] == [tok.encode(d) + [tok.eos_id] for d in docs]
    assert len(data.shards) > 1  # tiny shard_tokens forces several shards
    whole = np.concatenate([np.asarray(s, dtype=np.int64) for s in data.shards])
    for a, b in [(0, data.num_tokens), (3, 17), (5, 6)]:  # reads across shard boundaries
        assert data.read(a, b).tolist() == whole[a:b].tolist()


def test_uint32_for_large_vocab(tmp_path):
    vocab = {f"w{i}": i for i in range(70_000)}
    vocab["<|endoftext|>"] = 70_000
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "big.json"))
    (tmp_path / "t.txt").write_text("w1 w69999 w65536")
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "out"), str(tmp_path / "big.json"), False)
    data = open_dataset(str(tmp_path / "out"))
    assert data.meta["dtype"] == "uint32"
    assert data.read(0, 4).tolist() == [1, 69999, 65536, 70000]


def test_max_bytes_reuse_and_replace(tmp_path):
    for i in range(5):
        (tmp_path / f"f{i}.txt").write_text(str(i) * 100)
    out = str(tmp_path / "out")
    s = prepare([str(tmp_path)], out, "byte", progress=False, max_bytes=250)
    assert (s["documents"], s["bytes"]) == (3, 300)  # stops after the document reaching 250
    again = prepare([str(tmp_path)], out, "byte", progress=False, max_bytes=250, reuse=True)
    assert again["reused"] and again["tokens"] == s["tokens"]
    s_all = prepare([str(tmp_path)], out, "byte", progress=False, reuse=True)  # cap changed
    assert not s_all["reused"] and s_all["documents"] == 5
    assert open_dataset(out).meta["num_documents"] == 5  # the old dataset was replaced


def test_interrupted_prepare_leaves_no_dataset(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("good text")
    (tmp_path / "in" / "b.jsonl").write_text('{"text": "ok"}\nnot json\n')
    out = str(tmp_path / "out")
    with pytest.raises(ValueError, match=r"b.jsonl:2: not valid JSON"):
        prepare([str(tmp_path / "in")], out, "byte", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["in"]  # no out, no temporary folder
    # over an existing dataset, a failing prepare keeps the old one intact
    prepare([str(tmp_path / "in" / "a.txt")], out, "byte", progress=False)
    with pytest.raises(ValueError, match="b.jsonl:2"):
        prepare([str(tmp_path / "in")], out, "byte", progress=False)
    assert open_dataset(out).meta["num_documents"] == 1
    assert sorted(os.listdir(tmp_path)) == ["in", "out"]
    # a kill -9 leaves a hidden temporary folder; the next prepare removes it (its pid is dead)
    (tmp_path / ".out.tmp-999999999-abc" / "x").mkdir(parents=True)
    (tmp_path / f".out.tmp-{os.getpid()}-live").mkdir()  # a live owner's folder is kept
    prepare([str(tmp_path / "in" / "a.txt")], out, "byte", progress=False)
    assert sorted(os.listdir(tmp_path)) == [f".out.tmp-{os.getpid()}-live", "in", "out"]


def test_prepare_errors(tmp_path):
    out = str(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare([str(tmp_path / "missing.txt")], out, "byte", progress=False)
    with pytest.raises(ValueError, match="at least one input"):
        prepare([], out, "byte", progress=False)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "empty.txt").write_text("")
    (tmp_path / "e" / "bin.dat").write_bytes(b"\x00\x01")
    with pytest.raises(ValueError, match="no text"):
        prepare([str(tmp_path / "e")], out, "byte", progress=False)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match="no files"):
        prepare([str(tmp_path / "empty_dir")], out, "byte", progress=False)
    (tmp_path / "x.jsonl").write_text('{"body": "no text field"}\n')
    with pytest.raises(TypeError, match=r"x.jsonl:1: expected an object with a string 'text'"):
        prepare([str(tmp_path / "x.jsonl")], out, "byte", progress=False)
    (tmp_path / "t.txt").write_text("hello")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a feixing dataset"):
        prepare([str(tmp_path / "t.txt")], str(tmp_path / "mine"), "byte", progress=False)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"
    with pytest.raises(FileNotFoundError, match="nope.json"):
        prepare([str(tmp_path / "t.txt")], out, str(tmp_path / "nope.json"), progress=False)


def test_open_dataset_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="feixing prepare"):
        open_dataset(str(tmp_path / "absent"))
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "tokens-00000.bin").write_bytes(b"\x01\x00")
    with pytest.raises(FileNotFoundError, match="no meta.json.*feixing prepare"):
        open_dataset(str(tmp_path / "half"))
    (tmp_path / "t.txt").write_text("hello world")
    out = tmp_path / "out"
    prepare([str(tmp_path / "t.txt")], str(out), "byte", progress=False)
    with open(out / "tokens-00000.bin", "r+b") as f:
        f.truncate(4)
    with pytest.raises(ValueError, match="tokens-00000.bin.*wrong size"):
        open_dataset(str(out))


def test_progress_bar_on_stderr(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("hello")
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "o1"), "byte", progress=True)
    err = capsys.readouterr().err
    assert "1/1 files" in err and "files/s" in err and "M tokens" in err and "done in" in err
    prepare([str(tmp_path / "t.txt")], str(tmp_path / "o2"), "byte", progress=False)
    assert capsys.readouterr().err == ""


def test_demo_corpus_is_stdlib_source(tmp_path):
    paths = demo_corpus_paths()
    assert len(paths) > 100 and all(p.endswith(".py") for p in paths)
    parts = {part for p in paths for part in p.split(os.sep)}
    assert not parts & {"site-packages", "test", "tests", "__pycache__"}
    assert any(p.endswith(os.sep + "os.py") for p in paths)
    s = prepare(paths, str(tmp_path / "demo"), "byte", progress=False, max_bytes=200_000)
    assert s["bytes"] >= 200_000 and s["documents"] >= 2
