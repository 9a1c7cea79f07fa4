"""Data sources (stdlib, text dir, .bin memmap, JSONL, HF tokenizer) and their error messages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lowbit.trainer.config import DataConfig, DataKind, TokenDtype
from lowbit.trainer.data import BatchSource, DataError, eval_batches, load_data


def test_stdlib_split_is_by_file_and_deterministic():
    a = load_data(DataConfig(max_bytes=200_000), 256)
    b = load_data(DataConfig(max_bytes=200_000), 256)
    assert np.array_equal(a.train, b.train) and np.array_equal(a.val, b.val)
    assert a.vocab_size == 256 and a.train.max() < 256
    assert len(a.train) > 150_000 and len(a.val) > 1000
    text = bytes(a.train[:5000].astype(np.uint8)).decode("utf-8", errors="replace")
    assert "def " in text or "import " in text  # it really is Python source


def test_text_dir_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 400)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("another file " * 400)
    d = load_data(
        DataConfig(kind=DataKind.text_dir, path=str(tmp_path), pattern="*.txt", val_fraction=0.5), 256
    )
    assert len(d.train) + len(d.val) == 4800 + 5200 + 2  # two files plus a separator each
    with pytest.raises(DataError, match="no files matching"):
        load_data(DataConfig(kind=DataKind.text_dir, path=str(tmp_path), pattern="*.md"), 256)
    with pytest.raises(DataError, match="not a directory"):
        load_data(DataConfig(kind=DataKind.text_dir, path=str(tmp_path / "missing")), 256)
    with pytest.raises(DataError, match="needs data.path"):
        load_data(DataConfig(kind=DataKind.text_dir), 256)


def test_single_file_is_split_by_tokens_and_empty_data_is_an_error(tmp_path):
    (tmp_path / "only.txt").write_text("x" * 1000)
    d = load_data(
        DataConfig(kind=DataKind.text_dir, path=str(tmp_path), pattern="*.txt", val_fraction=0.1), 256
    )
    assert (len(d.train), len(d.val)) == (900, 101)  # 1000 bytes + a separator
    (tmp_path / "only.txt").write_text("")
    with pytest.raises(DataError, match="holds no tokens"):
        load_data(DataConfig(kind=DataKind.text_dir, path=str(tmp_path), pattern="*.txt"), 256)


@pytest.mark.parametrize("dtype", ["uint16", "uint32"])
def test_bin_memmap_dir_and_single_file(tmp_path, dtype):
    ids = np.arange(5000, dtype=dtype) % 1000
    ids.tofile(tmp_path / "train.bin")
    ids[:600].tofile(tmp_path / "val.bin")
    d = load_data(DataConfig(kind=DataKind.bin, path=str(tmp_path), bin_dtype=TokenDtype(dtype)), 1024)
    assert np.array_equal(np.asarray(d.train), ids) and len(d.val) == 600
    single = load_data(
        DataConfig(
            kind=DataKind.bin, path=str(tmp_path / "train.bin"), bin_dtype=TokenDtype(dtype), val_fraction=0.1
        ),
        1024,
    )
    assert len(single.train) == 4500 and len(single.val) == 500
    src = BatchSource(d.train, 16, 2, 1, 0, 1, seed=0, vocab_size=500)  # ids up to 999 > vocab
    with pytest.raises(DataError, match="vocab_size=500"):
        for step in range(50):
            src.get(step, 0)


def test_bin_errors(tmp_path):
    with pytest.raises(DataError, match="has no train.bin"):
        load_data(DataConfig(kind=DataKind.bin, path=str(tmp_path)), 1024)
    (tmp_path / "odd.bin").write_bytes(b"\x00" * 5)
    with pytest.raises(DataError, match="not a multiple"):
        load_data(DataConfig(kind=DataKind.bin, path=str(tmp_path / "odd.bin")), 1024)


def test_jsonl_and_bad_lines(tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text("\n".join(json.dumps({"text": f"record {i} " * 50}) for i in range(200)))
    d = load_data(DataConfig(kind=DataKind.jsonl, path=str(good), val_fraction=0.1), 256)
    assert len(d.train) > len(d.val) > 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_data(DataConfig(kind=DataKind.jsonl, path=str(bad)), 256)
    notext = tmp_path / "notext.jsonl"
    notext.write_text('{"body": "x"}\n')
    with pytest.raises(DataError, match='string "text" field'):
        load_data(DataConfig(kind=DataKind.jsonl, path=str(notext)), 256)
    with pytest.raises(DataError, match="does not exist"):
        load_data(DataConfig(kind=DataKind.jsonl, path=str(tmp_path / "none.jsonl")), 256)


def test_hf_tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        ["the quick brown fox jumps over the lazy dog"] * 50,
        trainers.BpeTrainer(vocab_size=60, special_tokens=["<unk>", "</s>"]),
    )
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    (tmp_path / "data").mkdir()
    for i in range(20):
        (tmp_path / "data" / f"{i}.txt").write_text("the quick brown fox jumps over the lazy dog " * 20)
    cfg = DataConfig(
        kind=DataKind.text_dir,
        path=str(tmp_path / "data"),
        pattern="*.txt",
        tokenizer=str(path),
        val_fraction=0.3,
    )
    d = load_data(cfg, 256)
    assert d.vocab_size == tok.get_vocab_size() and d.train.max() < d.vocab_size
    assert tok.token_to_id("</s>") in set(d.train.tolist())  # document separator
    with pytest.raises(DataError, match="model.vocab_size=16"):
        load_data(cfg, 16)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_data(
            DataConfig(
                kind=DataKind.text_dir,
                path=str(tmp_path / "data"),
                pattern="*.txt",
                tokenizer=str(tmp_path / "broken.json"),
            ),
            256,
        )


def test_ranks_split_the_same_global_batch():
    tokens = np.arange(100_000) % 256
    one = BatchSource(tokens, 32, 8, 1, rank=0, world=1, seed=3, vocab_size=256)
    r0 = BatchSource(tokens, 32, 4, 1, rank=0, world=2, seed=3, vocab_size=256)
    r1 = BatchSource(tokens, 32, 4, 1, rank=1, world=2, seed=3, vocab_size=256)
    for step in (0, 7, 500):  # 500 steps wraps into later epochs
        x1, y1 = one.get(step, 0)
        x2 = torch.cat([r0.get(step, 0)[0], r1.get(step, 0)[0]])
        assert sorted(map(tuple, x1.tolist())) == sorted(map(tuple, x2.tolist()))
        assert torch.equal(x1[:, 1:], y1[:, :-1])
    assert not torch.equal(r0.get(0, 0)[0], r1.get(0, 0)[0])


def test_eval_batches_cover_ranks_disjointly():
    tokens = np.arange(10_000) % 256
    all_ = eval_batches(tokens, 16, 8, 3, rank=0, world=1)
    parts = eval_batches(tokens, 16, 4, 3, rank=0, world=2) + eval_batches(tokens, 16, 4, 3, rank=1, world=2)
    flat = lambda bs: sorted(tuple(r) for x, _ in bs for r in x.tolist())  # noqa: E731
    assert flat(all_) == flat(parts) and len(flat(all_)) == 24
