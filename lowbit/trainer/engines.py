"""How a step is executed: plain/DDP PyTorch, or DeepSpeed's engine (ZeRO 0–3).

Both expose the same small surface to the loop — micro-batch context, loss, backward, step, save,
load — so trainer/loop.py reads the same whatever runs underneath.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.trainer.checkpoint import CheckpointError, load_torch, load_weights, save_torch, save_weights
from lowbit.trainer.config import DistBackend
from lowbit.trainer.distributed import DistContext
from lowbit.trainer.grad_clip import clip_and_step
from lowbit.trainer.loss import LanguageModelLoss, loss_fn

# The amaxes the last step's weight pairs were made with (lowbit.trainer.weight_pair_step), saved
# when that step wrote any: a resumed run writes the same pairs again.
WEIGHT_PAIRS_FILE = "weight_pairs.pt"


def _optimizer_is_per_rank(opt: torch.optim.Optimizer) -> bool:
    # Optimizers that shard their own state across ranks (distributed Shampoo) say so; their
    # state is saved by every rank rather than by rank 0 alone.
    return bool(getattr(opt, "per_rank_state", False))


def uses_cuda_graphs(compile_mode: str, device: torch.device) -> bool:
    """Whether torch.compile in this mode replays CUDA graphs on `device` (reduce-overhead and
    max-autotune do, on CUDA)."""
    from torch._inductor import list_mode_options

    return device.type == "cuda" and bool(list_mode_options(compile_mode).get("triton.cudagraphs", False))


class TorchEngine:
    """Single process or DistributedDataParallel."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        ctx: DistContext,
        grad_accum: int,
        grad_clip: float,
        compile_model: bool,
        compile_mode: str = "default",
        criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = loss_fn,
        weight_pairs_in_step: bool = False,
    ) -> None:
        self.module, self.optimizer, self.ctx = model, optimizer, ctx
        self.grad_accum, self.grad_clip = grad_accum, grad_clip
        # The loss is computed inside the compiled module, fused with the model's last layers.
        fwd: nn.Module = LanguageModelLoss(model, criterion)
        # Before DDP wraps the model: the step registers the pair buffers, which DDP must not sync.
        self.weight_pairs, self.weight_pairs_why_not = None, "off (train.weight_pairs_in_step=false)"
        if weight_pairs_in_step:
            pairs = _weight_pair_step(model, optimizer, ctx, compile_model)
            self.weight_pairs, self.weight_pairs_why_not = pairs
        self.ddp = None
        if ctx.backend is DistBackend.ddp:
            from torch.nn.parallel import DistributedDataParallel as DDP

            if self.weight_pairs is not None:
                # DDP broadcasts rank 0's buffers before every forward. Every rank's step writes the
                # same pairs (the same weights and all-reduced gradients), and broadcasting them
                # would move a byte per weight element each step (1b: 2 GB); the amax histories
                # are still synced.
                names = _buffer_names(fwd, self.weight_pairs.buffers())
                DDP._set_params_and_buffers_to_ignore_for_model(fwd, names)
            ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            fwd = self.ddp = DDP(fwd, device_ids=ids)
        # Compile the DDP wrapper rather than wrap a compiled module: dynamo then splits the graph
        # at DDP's bucket boundaries so gradient all-reduces overlap the backward pass.
        self.model = torch.compile(fwd, mode=compile_mode) if compile_model else fwd
        self.cuda_graphs = compile_model and uses_cuda_graphs(compile_mode, ctx.device)
        self._owned_grads: set[int] = set()  # ids of parameters whose .grad is our own copy

    def micro_context(self, last: bool) -> contextlib.AbstractContextManager:
        # Skip DDP's gradient all-reduce on all but the last micro-batch of a step.
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The criterion (by default the mean next-token cross-entropy) of the model on x against y."""
        return self.model(x, y)

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()
        if self.cuda_graphs and self.grad_accum > 1:
            # Under CUDA graphs a parameter's first gradient of a step is the backward graph's
            # output buffer, installed as .grad; the next replay overwrites it before the next
            # micro-batch accumulates into it (torch raises, or on some versions sums wrong
            # values: pytorch/pytorch#169545). Owned copies take the accumulation instead; later
            # micro-batches add into them in place.
            for p in self._params():
                if p.grad is not None and id(p) not in self._owned_grads:
                    p.grad = p.grad.clone()
                    self._owned_grads.add(id(p))

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def step(self) -> torch.Tensor:
        self._owned_grads.clear()
        params = self._params()
        # torch's fused AdamW applies the clipping factor inside its own pass (lowbit/trainer/grad_clip.py).
        if self.weight_pairs is not None:
            norm = self.weight_pairs.clip_and_step(params, self.grad_clip)
        else:
            norm = clip_and_step(self.optimizer, params, self.grad_clip)
        self.optimizer.zero_grad(set_to_none=True)
        # The norm stays on the device: reading it here would wait for the GPU every step, and the
        # host could not queue the next step's kernels meanwhile (an fp8 1b step lost ~20% to
        # that, run 25 of docs/BENCHMARKS.md). The loop reads it at log time.
        return norm.detach()

    def save(self, tmp: Path, trainer_state: dict[str, Any]) -> None:
        if self.ctx.is_main:
            save_weights(self.module, tmp / "model.safetensors")
            save_torch(trainer_state, tmp / "trainer.pt")
            if self.weight_pairs is not None and (pairs := self.weight_pairs.checkpoint_state()):
                save_torch(pairs, tmp / WEIGHT_PAIRS_FILE)
        if _optimizer_is_per_rank(self.optimizer):
            save_torch(self.optimizer.state_dict(), tmp / f"optimizer.rank{self.ctx.rank}.pt")
        elif self.ctx.is_main:
            save_torch(self.optimizer.state_dict(), tmp / "optimizer.pt")

    def load(self, path: Path) -> dict[str, Any]:
        load_weights(self.module, path / "model.safetensors")
        name = (
            f"optimizer.rank{self.ctx.rank}.pt" if _optimizer_is_per_rank(self.optimizer) else "optimizer.pt"
        )
        if not (path / name).is_file():
            raise CheckpointError(
                f"checkpoint {path} has no {name} (written with another world size or optimizer?)"
            )
        self.optimizer.load_state_dict(load_torch(path / name))
        pairs = load_torch(path / WEIGHT_PAIRS_FILE) if (path / WEIGHT_PAIRS_FILE).is_file() else {}
        if self.weight_pairs is not None:
            # The pairs the saving step wrote, written again; layers without one quantize next forward.
            try:
                self.weight_pairs.restore(pairs)
            except ValueError as e:
                raise CheckpointError(f"checkpoint {path}: {WEIGHT_PAIRS_FILE}: {e}") from e
        elif pairs:
            warnings.warn(
                f"checkpoint {path} was saved with the fp8 weight pairs written by the optimizer step "
                f"and this run quantizes the weights in the forward ({self.weight_pairs_why_not}): "
                "the first forward records each weight's amax into its history a second time, so the "
                "run is not bit for bit the one that saved it", stacklevel=2)
        return load_torch(path / "trainer.pt")


def _weight_pair_step(model: nn.Module, optimizer: torch.optim.Optimizer, ctx: DistContext,
                      compiled: bool) -> tuple[Any, str | None]:
    # (lowbit.trainer.weight_pair_step.WeightPairStep, None), or (None, why it does not apply).
    # Compiled only: the eager layers quantize their weights themselves. Under DDP every rank
    # writes the same pairs (TorchEngine keeps them out of DDP's buffer sync).
    from lowbit.kernels.quantize import interpret, triton_available
    from lowbit.trainer.grad_clip import folds_clipping

    if not compiled:
        return None, "the model is not compiled (train.compile=false)"
    if ctx.world > 1 and ctx.backend is not DistBackend.ddp:
        backend = getattr(ctx.backend, "value", ctx.backend)
        return None, f"{ctx.world} processes under {backend} (only DDP keeps whole weights on each rank)"
    if not (ctx.device.type == "cuda" or interpret()) or not triton_available():
        return None, f"its kernels need CUDA (or Triton's interpreter) and Triton; device {ctx.device}"
    if not (isinstance(optimizer, torch.optim.AdamW) and folds_clipping(optimizer)):
        return None, f"the optimizer is {type(optimizer).__name__}, not torch's fused AdamW"
    from lowbit.trainer.weight_pair_step import WeightPairStep

    step = WeightPairStep(model, optimizer)
    if not step.layers:
        some = list(step.skipped.items())[:3]
        return None, "no layer qualifies: " + "; ".join(f"{k}: {v}" for k, v in some)
    return step, None


def _buffer_names(module: nn.Module, tensors: list[torch.Tensor]) -> list[str]:
    # The names under which `module` holds these buffers (DDP's ignore list takes names).
    ids = {id(t) for t in tensors}
    return [n for n, b in module.named_buffers() if id(b) in ids]


def _import_deepspeed_on_cpu() -> None:
    # DeepSpeed picks its accelerator once, when it is first imported, from what the machine has:
    # on a GPU machine a CPU run (train.device=cpu) would get CUDA's, and ranks past the GPU count
    # would fail with "invalid device ordinal". DS_ACCELERATOR=cpu asks for the CPU for that first
    # import only (then the caller's value is back); if this process imported DeepSpeed before with
    # another accelerator, refuse rather than run on the wrong device.
    before = os.environ.get("DS_ACCELERATOR")
    os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
    finally:
        if before is None:
            os.environ.pop("DS_ACCELERATOR")
        else:
            os.environ["DS_ACCELERATOR"] = before
    if name != "cpu":
        raise RuntimeError(
            f"train.device=cpu with dist=deepspeed, but DeepSpeed already uses its {name!r} accelerator in "
            "this process (DS_ACCELERATOR, or an earlier DeepSpeed run); start a new process for a CPU run"
        )


class DeepSpeedEngine:
    """DeepSpeed's real engine with our optimizer passed in as the client optimizer."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        ctx: DistContext,
        micro_batch: int,
        grad_accum: int,
        grad_clip: float,
        zero_stage: int,
        bf16: bool,
    ) -> None:
        if ctx.device.type == "cpu":
            _import_deepspeed_on_cpu()
        import deepspeed

        self.ctx, self.zero_stage = ctx, zero_stage
        ds_config = {
            "train_micro_batch_size_per_gpu": micro_batch,
            "gradient_accumulation_steps": grad_accum,
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": zero_stage},
            "bf16": {"enabled": bf16},
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 1 << 30,
            "wall_clock_breakdown": False,
        }
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
        )
        self.client_optimizer = optimizer
        self.module = self.engine.module
        self.model = self.engine

    def micro_context(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy of the model on x against y."""
        return loss_fn(self.engine(x), y)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps itself
        self.engine.step()  # a no-op except at the accumulation boundary

    def step(self) -> float | torch.Tensor:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def save(self, tmp: Path, trainer_state: dict[str, Any]) -> None:
        self.engine.save_checkpoint(str(tmp / "deepspeed"), tag="state", save_latest=False)
        if self.zero_stage == 3:
            import deepspeed

            params = list(self.module.parameters())
            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                if self.ctx.is_main:
                    save_weights(self.module, tmp / "model.safetensors")
        elif self.ctx.is_main:
            save_weights(self.module, tmp / "model.safetensors")
        if self.ctx.is_main:
            save_torch(trainer_state, tmp / "trainer.pt")

    def load(self, path: Path) -> dict[str, Any]:
        if not (path / "deepspeed").is_dir():
            raise CheckpointError(
                f"checkpoint {path} was not written by dist=deepspeed (no deepspeed/ folder)"
            )
        load_path, _ = self.engine.load_checkpoint(
            str(path / "deepspeed"), tag="state", load_optimizer_states=True, load_lr_scheduler_states=False
        )
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {path / 'deepspeed'}")
        return load_torch(path / "trainer.pt")
