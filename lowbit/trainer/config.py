"""The run's configuration schema (Hydra structured configs).

Every group (model/, data/, quant/, optim/, dist/, logger/) merges into a typed dataclass node, so
a misspelt key or a value of the wrong type is rejected before any work starts.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore

from lowbit.nn.llama import LlamaConfig
from lowbit.optim.config import OptimConfig
from lowbit.quant.config import QuantConfig


class DataKind(str, Enum):
    stdlib = "stdlib"  # the Python standard library's own .py files (always present)
    text_dir = "text_dir"  # a directory of text files
    bin = "bin"  # a pre-tokenized memmap of uint16/uint32 token ids (nanoGPT layout)
    jsonl = "jsonl"  # one {"text": ...} object per line


class TokenDtype(str, Enum):
    uint16 = "uint16"
    uint32 = "uint32"


@dataclass
class DataConfig:
    kind: DataKind = DataKind.stdlib
    # File or directory; for `bin`, a directory with train.bin/val.bin or a single .bin file.
    path: str | None = None
    # Path to an HF tokenizer.json; None means byte-level tokens (vocab 256).
    tokenizer: str | None = None
    bin_dtype: TokenDtype = TokenDtype.uint16
    # Glob of files to read for text_dir / stdlib.
    pattern: str = "*.py"
    # Share of files (text_dir, stdlib, jsonl records) or tokens (single .bin) held out for eval.
    val_fraction: float = 0.05
    # Stop reading after this many bytes of text (0 = everything); keeps the default run small.
    max_bytes: int = 0


class Precision(str, Enum):
    auto = "auto"  # bf16 autocast on CUDA, fp32 on CPU
    fp32 = "fp32"
    bf16 = "bf16"


class CompileMode(str, Enum):
    # torch.compile modes. reduce_overhead replays CUDA graphs, which removes the per-layer launch
    # and Python cost that otherwise bounds small layers (and QuantLinear's custom ops).
    default = "default"
    reduce_overhead = "reduce-overhead"
    max_autotune = "max-autotune"
    max_autotune_no_cudagraphs = "max-autotune-no-cudagraphs"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


@dataclass
class TrainConfig:
    steps: int = 500
    seq_len: int = 128
    micro_batch_size: int = 16
    # Micro-batches per optimizer step on each rank; global batch = micro · accum · world size.
    grad_accum: int = 1
    warmup_steps: int = 50
    # Cosine decays to lr · min_lr_ratio at the last step.
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_batches: int = 8
    log_every: int = 10
    seed: int = 1337
    precision: Precision = Precision.auto
    device: Device = Device.auto
    compile: bool = False
    # torch.compile mode when compile=true (names: default, reduce_overhead, max_autotune, ...).
    compile_mode: CompileMode = CompileMode.default
    # Deterministic kernels (torch.use_deterministic_algorithms, cuBLAS with a fixed workspace): on a
    # GPU the same run twice, or a run killed and resumed, then gives the same losses bit for bit
    # (CPU runs are so without it). Off by default: it can cost speed, and an op that has no
    # deterministic form raises instead of running.
    deterministic: bool = False
    # Stop after this many steps in this process (0 = run to `steps`); used to test kill-and-resume.
    stop_after: int = 0
    # fp8 delayed scaling, compiled, one process or DDP, fused AdamW: the optimizer step writes each
    # quantized layer's fp8 weight pair for the next forward, which then reads it instead of
    # quantizing the weight again (lowbit/trainer/weight_pair_step.py). Ignored where it does not
    # apply (the run's log says why).
    weight_pairs_in_step: bool = True


@dataclass
class CheckpointConfig:
    # false: write no checkpoints at all (benchmarks); resume then has nothing to continue from.
    enabled: bool = True
    # Save every N steps (0 = only at the end); the final step is always saved.
    every: int = 250
    keep_last: int = 2


class DistBackend(str, Enum):
    none = "none"
    ddp = "ddp"
    deepspeed = "deepspeed"


@dataclass
class DistConfig:
    backend: DistBackend = DistBackend.none
    zero_stage: int = 0
    # Process-group backend: auto = nccl on CUDA, gloo on CPU.
    pg_backend: str = "auto"


class LoggerKind(str, Enum):
    console = "console"
    wandb = "wandb"
    both = "both"


class WandbMode(str, Enum):
    auto = "auto"  # online with WANDB_API_KEY set, offline otherwise
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class LoggerConfig:
    kind: LoggerKind = LoggerKind.both
    project: str = "lowbit"
    entity: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: WandbMode = WandbMode.auto
    # Live progress bar (loss, lr, tokens/s, ETA) on rank 0's console.
    progress: bool = True


@dataclass
class RunConfig:
    model: LlamaConfig = field(default_factory=LlamaConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Where runs are written: <out_dir>/<run_name>/{checkpoints,wandb,summary.json}.
    out_dir: str = "runs"
    run_name: str = "default"
    # auto (newest complete checkpoint in this run's directory, if any) | none (fresh; refuses to
    # overwrite existing checkpoints) | a checkpoint directory.
    resume: str = "auto"


def register_configs() -> None:
    ConfigStore.instance().store(name="run_schema", node=RunConfig)


def _schema_at(path: list[str]) -> Any:
    """The dataclass type at a dotted path of RunConfig, or None if the path leaves the schema."""
    node: Any = RunConfig
    for key in path:
        if not (isinstance(node, type) and is_dataclass(node)):
            return None
        hints = typing.get_type_hints(node)
        if key not in hints:
            return None
        node = hints[key]
    return node


def check_overrides(args: list[str]) -> str | None:
    """Return an error message for the first `a.b=v` override whose key is not in the schema.

    Hydra already rejects such keys, but without naming what would have been valid; this names
    the closest valid keys so a typo is fixed in one go.
    """
    for arg in args:
        if arg.startswith(("+", "~", "-", "hydra.")) or "=" not in arg:
            continue
        key = arg.split("=", 1)[0]
        parts = key.split(".")
        if len(parts) == 1 and parts[0] in {f.name for f in fields(RunConfig)}:
            continue  # a group choice (model=125m) or a top-level value
        for depth in range(len(parts)):
            parent = _schema_at(parts[:depth])
            if parent is None:
                break
            if not (isinstance(parent, type) and is_dataclass(parent)):
                break
            valid = [f.name for f in fields(parent)]
            if parts[depth] not in valid:
                where = ".".join(parts[:depth]) or "the top level"
                close = difflib.get_close_matches(parts[depth], valid, n=3)
                hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
                return (
                    f"Unknown config key '{key}': '{parts[depth]}' is not a field of {where}.{hint} "
                    f"Valid keys there: {', '.join(valid)}."
                )
    return None
