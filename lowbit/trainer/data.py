"""Training data: load a corpus into token arrays, split train/val, and serve deterministic batches.

Batches are a pure function of (seed, step, micro-batch, rank): the train stream is cut into
non-overlapping windows of seq_len+1 tokens, shuffled once per epoch by a seeded permutation, and
optimizer step s consumes the next `global_batch` windows. Rank r takes its own slice of them, so
the data is sharded by rank and the union over ranks does not depend on the world size (a 2-rank
run sees the same samples as a 1-rank run with twice the micro-batch). Resuming at step s needs
nothing but s.
"""

from __future__ import annotations

import json
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lowbit.trainer.config import DataConfig, DataKind


class DataError(ValueError):
    """Missing, empty or malformed training data."""


@dataclass
class TokenData:
    train: np.ndarray  # 1-D token ids
    val: np.ndarray
    vocab_size: int
    description: str


def _in_val(key: str, val_fraction: float) -> bool:
    # A stable hash of the file path (or record index): the split is the same on every machine
    # and does not move when files are added elsewhere in the tree.
    return (zlib.crc32(key.encode()) % 10_000) < val_fraction * 10_000


class ByteTokenizer:
    vocab_size = 256
    separator = 0  # NUL never occurs in text files, so it marks document boundaries

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8) for t in texts]


class HFTokenizer:
    def __init__(self, path: str) -> None:
        p = Path(path)
        if not p.is_file():
            raise DataError(f"data.tokenizer={path!r} does not exist (expected an HF tokenizer.json file)")
        try:
            from tokenizers import Tokenizer
        except ImportError as e:  # pragma: no cover - depends on the install
            raise DataError("data.tokenizer needs the `tokenizers` package: pip install 'lowbit[hf]'") from e
        try:
            self.tok = Tokenizer.from_file(str(p))
        except Exception as e:
            raise DataError(f"data.tokenizer={path!r} is not a valid tokenizer.json: {e}") from e
        self.vocab_size = self.tok.get_vocab_size()
        sep = None
        for name in ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"):
            sep = self.tok.token_to_id(name)
            if sep is not None:
                break
        self.separator = sep

    def encode(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int64) for e in self.tok.encode_batch(texts)]


def _join(docs: list[np.ndarray], separator: int | None) -> np.ndarray:
    parts = [np.zeros(0, dtype=np.int64)]
    for d in docs:
        if len(d) == 0:
            continue
        parts.append(d.astype(np.int64))
        if separator is not None:
            parts.append(np.array([separator], dtype=np.int64))
    return np.concatenate(parts)


def _read_text_files(root: Path, pattern: str, max_bytes: int, val_fraction: float) -> tuple[list, list]:
    if not root.is_dir():
        raise DataError(f"data.path={str(root)!r} is not a directory")
    files = sorted(p for p in root.rglob(pattern) if p.is_file() and "site-packages" not in p.parts)
    if not files:
        raise DataError(f"no files matching data.pattern={pattern!r} under {str(root)!r}")
    train, val = [], []
    budget = {"train": max_bytes or float("inf"), "val": (max_bytes * val_fraction) or float("inf")}
    for f in files:
        rel = f.relative_to(root).as_posix()
        split = "val" if _in_val(rel, val_fraction) else "train"
        if budget[split] <= 0:
            continue
        text = f.read_bytes().decode("utf-8", errors="replace")
        budget[split] -= len(text)
        (val if split == "val" else train).append(text)
    return train, val


def _read_jsonl(path: Path, val_fraction: float) -> tuple[list, list]:
    if not path.is_file():
        raise DataError(f"data.path={str(path)!r} does not exist (expected a .jsonl file)")
    train, val = [], []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                raise DataError(f'{path}:{lineno}: expected an object with a string "text" field')
            (val if _in_val(str(lineno), val_fraction) else train).append(rec["text"])
    return train, val


def _load_bin(cfg: DataConfig) -> tuple[np.ndarray, np.ndarray, str]:
    path = Path(cfg.path)
    dtype = np.dtype(cfg.bin_dtype.value if hasattr(cfg.bin_dtype, "value") else cfg.bin_dtype)
    if path.is_dir():
        tr, va = path / "train.bin", path / "val.bin"
        for f in (tr, va):
            if not f.is_file():
                raise DataError(f"data.path={str(path)!r} has no {f.name} (expected train.bin and val.bin)")
        train, val = np.memmap(tr, dtype=dtype, mode="r"), np.memmap(va, dtype=dtype, mode="r")
    elif path.is_file():
        if path.stat().st_size % dtype.itemsize:
            raise DataError(
                f"{path}: size {path.stat().st_size} is not a multiple of {dtype} ({dtype.itemsize} B)"
            )
        data = np.memmap(path, dtype=dtype, mode="r")
        cut = int(len(data) * (1 - cfg.val_fraction))
        train, val = data[:cut], data[cut:]
    else:
        raise DataError(f"data.path={str(path)!r} does not exist (expected a .bin file or a directory)")
    return train, val, f"{path} ({dtype})"


def load_data(cfg: DataConfig, model_vocab_size: int) -> TokenData:
    kind = DataKind(cfg.kind)
    if not 0.0 < cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
    if kind is not DataKind.stdlib and not cfg.path:
        raise DataError(f"data.kind={kind.value} needs data.path")
    if kind is DataKind.bin:
        if cfg.tokenizer:
            raise DataError("data.tokenizer is meaningless for data.kind=bin (the ids are already tokens)")
        train, val, desc = _load_bin(cfg)
        vocab = model_vocab_size
    else:
        tok = HFTokenizer(cfg.tokenizer) if cfg.tokenizer else ByteTokenizer()
        if kind is DataKind.stdlib:
            root = Path(sysconfig.get_paths()["stdlib"])
            texts_train, texts_val = _read_text_files(root, cfg.pattern, cfg.max_bytes, cfg.val_fraction)
            desc = f"Python stdlib sources {root}"
        elif kind is DataKind.text_dir:
            texts_train, texts_val = _read_text_files(
                Path(cfg.path), cfg.pattern, cfg.max_bytes, cfg.val_fraction
            )
            desc = f"text files {cfg.path}/{cfg.pattern}"
        else:
            texts_train, texts_val = _read_jsonl(Path(cfg.path), cfg.val_fraction)
            desc = f"JSONL {cfg.path}"
        train = _join(tok.encode(texts_train), tok.separator)
        val = _join(tok.encode(texts_val), tok.separator)
        vocab = tok.vocab_size
        desc += f", {'tokenizer ' + cfg.tokenizer if cfg.tokenizer else 'byte tokens'}"
    if vocab > model_vocab_size:
        raise DataError(
            f"the tokenizer has {vocab} tokens but model.vocab_size={model_vocab_size}; "
            f"set model.vocab_size>={vocab}"
        )
    if len(train) + len(val) == 0:
        raise DataError(f"{desc} holds no tokens; check data.path/pattern")
    if len(train) == 0 or len(val) == 0:
        # Too few files/records for a split by file: hold out the stream's last tokens instead.
        stream = train if len(train) else val
        cut = int(len(stream) * (1 - cfg.val_fraction))
        train, val = stream[:cut], stream[cut:]
        desc += ", split by tokens"
    for name, arr in (("train", train), ("val", val)):
        if len(arr) == 0:
            raise DataError(f"the {name} split of {desc} is empty (no tokens); check data.path/pattern")
    return TokenData(train=train, val=val, vocab_size=vocab, description=desc)


class BatchSource:
    """Deterministic (input, target) micro-batches for a given step, micro-batch index and rank."""

    def __init__(
        self,
        tokens: np.ndarray,
        seq_len: int,
        micro_batch: int,
        grad_accum: int,
        rank: int,
        world: int,
        seed: int,
        vocab_size: int,
    ) -> None:
        self.vocab_size = vocab_size
        self.tokens, self.seq_len = tokens, seq_len
        self.micro_batch, self.grad_accum, self.rank, self.world = micro_batch, grad_accum, rank, world
        self.seed = seed
        self.n_windows = (len(tokens) - 1) // seq_len
        if self.n_windows < 1:
            raise DataError(f"the train split has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}")
        self._perm_epoch, self._perm = -1, None

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world

    def _window(self, i: int) -> int:
        epoch, pos = divmod(i, self.n_windows)
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.n_windows, generator=g), epoch
        return int(self._perm[pos])

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.n_windows

    def get(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = step * self.global_batch + (micro * self.world + self.rank) * self.micro_batch
        rows = []
        for i in range(first, first + self.micro_batch):
            start = self._window(i) * self.seq_len
            rows.append(np.asarray(self.tokens[start : start + self.seq_len + 1], dtype=np.int64))
        batch = torch.from_numpy(np.stack(rows))
        if int(batch.max()) >= self.vocab_size:  # a pre-tokenized .bin from another tokenizer
            raise DataError(
                f"token id {int(batch.max())} in the data is >= model.vocab_size={self.vocab_size}"
            )
        return batch[:, :-1], batch[:, 1:]


def eval_batches(
    tokens: np.ndarray, seq_len: int, micro_batch: int, n_batches: int, rank: int, world: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of validation windows spread over the val split; each rank takes every world-th.

    The set is `n_batches` global micro-batches (micro_batch · world windows each), so it is the
    same for any split of one global batch across ranks.
    """
    n_windows = (len(tokens) - 1) // seq_len
    if n_windows < 1:
        raise DataError(f"the val split has {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}")
    total = min(n_windows, n_batches * micro_batch * world)
    starts = np.linspace(0, n_windows - 1, total).astype(np.int64) * seq_len
    mine = starts[rank::world]
    out = []
    for i in range(0, len(mine), micro_batch):
        rows = [np.asarray(tokens[s : s + seq_len + 1], dtype=np.int64) for s in mine[i : i + micro_batch]]
        batch = torch.from_numpy(np.stack(rows))
        out.append((batch[:, :-1], batch[:, 1:]))
    return out
