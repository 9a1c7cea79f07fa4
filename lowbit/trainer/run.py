"""run(cfg): set up everything a training run needs, run the loop, write the summary."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lowbit.nn import quant_linear_graph
from lowbit.nn.convert import apply_quant_config
from lowbit.nn.llama import Llama
from lowbit.optim import build_optimizer, wants_bf16_params
from lowbit.quant.telemetry import QuantTelemetry
from lowbit.trainer import checkpoint as ckpt
from lowbit.trainer.config import CompileMode, DistBackend, Precision, RunConfig, TrainConfig
from lowbit.trainer.data import BatchSource, eval_batches, load_data
from lowbit.trainer.distributed import DistContext, barrier, broadcast_object, init_distributed, shutdown
from lowbit.trainer.engines import DeepSpeedEngine, TorchEngine, uses_cuda_graphs
from lowbit.trainer.loggers import RunLogger, check_logger_available
from lowbit.trainer.loop import LoopState, evaluate, train_loop
from lowbit.trainer.metrics import device_peak_flops, format_bytes, mfu, peak_memory_bytes


def _as_run_config(cfg: DictConfig | RunConfig) -> RunConfig:
    if isinstance(cfg, RunConfig):
        return cfg
    return OmegaConf.to_object(cfg)


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _module_generators(model: torch.nn.Module) -> dict[str, torch.Generator]:
    """Generators that layers own (QuantLinear's Hadamard-sign and stochastic-rounding stream).

    They are saved with the checkpoint so that a resumed quantized run draws the same noise.
    """
    return {
        name: m.generator
        for name, m in model.named_modules()
        if isinstance(getattr(m, "generator", None), torch.Generator)
    }


def _graph_call_counters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """QuantLinear's compiled-graph call counters (its seeds there are hashed from them; see
    lowbit.nn.quant_linear_graph): saved with the checkpoint, like the generators above."""
    return {
        name: m.graph_calls
        for name, m in model.named_modules()
        if isinstance(getattr(m, "graph_calls", None), torch.Tensor)
    }


def _amax_histories(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Delayed scaling's amax histories (QuantLinear.amax_history, not in the state dict): saved
    with the checkpoint, so a resumed run scales as the uninterrupted one. Rank 0's are saved and
    every rank resumes with them: exact under DDP, which broadcasts rank 0's buffers at every
    forward; DeepSpeed's ranks keep their own histories, so theirs then differ slightly."""
    return {
        name: m.amax_history
        for name, m in model.named_modules()
        if getattr(getattr(m, "recipe", None), "amax_history", 0) > 0
        and isinstance(getattr(m, "amax_history", None), torch.Tensor)
    }


def _check_same_model(path: Path, cfg_dict: dict) -> None:
    """Refuse to resume a checkpoint of a differently shaped model, naming what differs; warn when
    the quantization recipe changed (allowed: e.g. finishing an fp8 run in bf16)."""
    config = ckpt.load_torch(path / "trainer.pt").get("config", {})
    saved_recipe = (config.get("quant") or {}).get("recipe")
    now_recipe = (cfg_dict.get("quant") or {}).get("recipe")
    if saved_recipe is not None and now_recipe is not None and saved_recipe != now_recipe:
        warnings.warn(
            f"resuming {path}, trained with quant={saved_recipe}, under quant={now_recipe}: the run "
            f"continues with {now_recipe} (pass quant={saved_recipe} to keep the checkpoint's recipe)",
            stacklevel=2,
        )
    saved = config.get("model")
    if saved is None:
        return
    diff = [
        f"model.{k}: saved {saved[k]!r}, now {v!r}" for k, v in cfg_dict["model"].items() if saved.get(k) != v
    ]
    if diff:
        raise ckpt.CheckpointError(
            f"checkpoint {path} was written for another model ({'; '.join(diff)}). "
            "Pass the same model settings to continue it, or start a new run with run_name=<new name>."
        )


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _autocast(precision: Precision, device: torch.device):
    precision = Precision(precision)
    if precision is Precision.auto:
        precision = Precision.bf16 if device.type == "cuda" else Precision.fp32
    if precision is Precision.fp32:
        return precision, contextlib.nullcontext
    return precision, partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


class CheckpointWriter:
    """Called by the loop when a checkpoint is due; writes atomically and prunes old ones."""

    def __init__(
        self,
        engine,
        ctx: DistContext,
        root: Path,
        enabled: bool,
        every: int,
        keep_last: int,
        total: int,
        extra: dict[str, Any],
        logger: RunLogger,
    ) -> None:
        self.enabled = enabled
        self.engine, self.ctx, self.root, self.every, self.keep_last = engine, ctx, root, every, keep_last
        self.total, self.extra, self.logger = total, extra, logger

    def due(self, step: int, stop_at: int) -> bool:
        if not self.enabled:
            return False
        return step == stop_at or step == self.total or (self.every > 0 and step % self.every == 0)

    def __call__(self, state: LoopState) -> Path:
        tmp = None
        if self.ctx.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = ckpt.temp_dir_for(self.root, state.step)
            tmp.mkdir()
        tmp = Path(broadcast_object(str(tmp), self.ctx))
        trainer_state = {
            "step": state.step,
            "rng": _rng_state(self.ctx.device),
            "module_rng": {k: g.get_state() for k, g in _module_generators(self.engine.module).items()},
            "module_graph_calls": {k: int(c) for k, c in _graph_call_counters(self.engine.module).items()},
            "module_amax_history": {k: h.tolist() for k, h in _amax_histories(self.engine.module).items()},
            "world": self.ctx.world,
            "data_position": {"step": state.step, "tokens_seen": state.tokens_seen},
            "train_losses": state.train_losses,
            "val_losses": state.val_losses,
            "train_seconds": state.train_seconds,
            "wandb_id": self.logger.wandb_id,
            **self.extra,
        }
        self.engine.save(tmp, trainer_state)
        barrier(self.ctx)
        final = None
        if self.ctx.is_main:
            final = ckpt.finalize(tmp, self.root, state.step)
            ckpt.prune(self.root, self.keep_last)
        barrier(self.ctx)
        return final


def run(cfg: DictConfig | RunConfig) -> dict[str, Any]:
    """Train per `cfg` and return the run's summary (also written to <run_dir>/summary.json)."""
    rc = _as_run_config(cfg)
    cfg_dict = OmegaConf.to_container(OmegaConf.structured(rc), resolve=True, enum_to_str=True)
    tc = rc.train
    for key in ("steps", "seq_len", "micro_batch_size", "grad_accum", "log_every"):
        if getattr(tc, key) <= 0:
            raise ValueError(f"train.{key}={getattr(tc, key)} must be positive")
    if tc.seq_len > rc.model.max_seq_len:
        raise ValueError(f"train.seq_len={tc.seq_len} exceeds model.max_seq_len={rc.model.max_seq_len}")
    check_logger_available(rc.logger)

    ctx = init_distributed(rc.dist, tc.device)
    try:
        with deterministic_algorithms(tc.deterministic):
            summary = _run(rc, cfg_dict, ctx)
        barrier(ctx)  # no rank tears the process group down while a peer still uses it
        return summary
    finally:
        shutdown(ctx)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    """torch's deterministic algorithms for the duration (train.deterministic), then the caller's
    settings again (a run in the same process must not change them for what comes after)."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    # cuBLAS repeats its reduction order with a fixed workspace, which torch sizes from this
    # variable when the process first uses cuBLAS: in train.py that comes after this. A run started
    # in a process that used cuBLAS before keeps that workspace (on one stream cuBLAS repeats its
    # results anyway); torch checks the variable on every call.
    set_workspace = "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    if set_workspace:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)
        if set_workspace:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def _select_graph_ops(tc: TrainConfig, device: torch.device) -> None:
    # CUDA graphs (compile_mode reduce_overhead or max_autotune) replay QuantLinear's graph ops
    # without running their Python, which otherwise makes them slower than eager layers; so with
    # CUDA graphs the recipes that are not traced run as opaque graph ops
    # (lowbit.nn.quant_linear_graph), and without them as eager layers, unless LOWBIT_GRAPH_OPS
    # says otherwise. Decided for every run (a run in the same process may have chosen
    # otherwise) before the model is built.
    env = quant_linear_graph.mode_from_env()
    if env is not None:
        quant_linear_graph.select_mode(env)
        return
    cuda_graphs = tc.compile and uses_cuda_graphs(CompileMode(tc.compile_mode).value, device)
    quant_linear_graph.select_mode("opaque" if cuda_graphs else "0")


def _run(rc: RunConfig, cfg_dict: dict, ctx: DistContext) -> dict[str, Any]:
    tc = rc.train
    run_dir = Path(rc.out_dir) / rc.run_name
    ckpt_root = run_dir / "checkpoints"
    resume_from = ckpt.resolve_resume(rc.resume, ckpt_root)
    if resume_from is not None:
        ckpt.verify(resume_from)  # fail before any work if the checkpoint is damaged
        _check_same_model(resume_from, cfg_dict)

    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    random.seed(tc.seed)
    data = load_data(rc.data, rc.model.vocab_size)
    _select_graph_ops(tc, ctx.device)
    model = Llama(rc.model)
    model = apply_quant_config(model, rc.quant).to(ctx.device)
    if wants_bf16_params(rc.optim):
        # Pure-BF16 training (no fp32 master copy): parameters only; the rotary tables stay fp32.
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    optimizer = build_optimizer(model, rc.optim)
    for g in optimizer.param_groups:
        g.setdefault("base_lr", g["lr"])
    precision, autocast = _autocast(tc.precision, ctx.device)
    if ctx.backend is DistBackend.deepspeed:
        # DeepSpeed's own bf16 mode keeps fp32 master weights; autocast stays off under it.
        engine = DeepSpeedEngine(
            model,
            optimizer,
            ctx,
            tc.micro_batch_size,
            tc.grad_accum,
            tc.grad_clip,
            rc.dist.zero_stage,
            bf16=precision is Precision.bf16,
        )
        autocast = contextlib.nullcontext
    else:
        engine = TorchEngine(
            model, optimizer, ctx, tc.grad_accum, tc.grad_clip, tc.compile,
            CompileMode(tc.compile_mode).value,
            # telemetry steps run the layers eagerly, which quantize their weights themselves
            weight_pairs_in_step=tc.weight_pairs_in_step and rc.quant.telemetry_every <= 0,
        )

    state, wandb_id = LoopState(step=0), None
    if resume_from is not None:
        saved = engine.load(resume_from)
        _set_rng_state(saved["rng"], ctx.device)
        for name, gen in _module_generators(model).items():
            if name in saved.get("module_rng", {}):
                gen.set_state(saved["module_rng"][name])
        for name, calls in _graph_call_counters(model).items():
            if name in saved.get("module_graph_calls", {}):
                calls.fill_(saved["module_graph_calls"][name])
        for name, hist in _amax_histories(model).items():
            if name in saved.get("module_amax_history", {}):
                old = torch.tensor(saved["module_amax_history"][name], dtype=hist.dtype)
                if old.shape != hist.shape:  # another history length (a recipe changed on resume)
                    warnings.warn(
                        f"{name}: the checkpoint's amax history is {tuple(old.shape)}, the layer's "
                        f"{tuple(hist.shape)}; the layer starts a new history", stacklevel=2,
                    )
                    continue
                hist.copy_(old)
        state = LoopState(
            step=saved["step"],
            train_losses=saved["train_losses"],
            val_losses=saved["val_losses"],
            tokens_seen=saved["data_position"]["tokens_seen"],
            train_seconds=saved["train_seconds"],
        )
        wandb_id = saved.get("wandb_id")

    batches = BatchSource(
        data.train,
        tc.seq_len,
        tc.micro_batch_size,
        tc.grad_accum,
        ctx.rank,
        ctx.world,
        tc.seed,
        rc.model.vocab_size,
    )
    val_batches = eval_batches(
        data.val, tc.seq_len, tc.micro_batch_size, tc.eval_batches, ctx.rank, ctx.world
    )
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    logger = RunLogger(rc.logger, run_dir, cfg_dict, ctx.is_main, tc.steps, state.step, wandb_id)
    n_params = model.num_params(exclude_embeddings=False)
    logger.info(
        f"[bold]lowbit[/bold] {rc.model.name} ({n_params / 1e6:.2f}M params) on "
        f"{ctx.world}× {ctx.device.type}, {precision.value}, quant={rc.quant.recipe}, "
        f"optim={cfg_dict['optim']['name']}, "
        f"dist={ctx.backend.value}; data: {data.description} "
        f"({len(data.train):,} train / {len(data.val):,} val tokens); global batch "
        f"{batches.global_batch}×{tc.seq_len} tokens"
    )
    if resume_from is not None:
        logger.info(f"resumed from {resume_from} at step {state.step}")
    pairs = getattr(engine, "weight_pairs", None)
    if pairs is not None:
        first = next(iter(pairs.skipped.values()), "")
        skipped = f" ({len(pairs.skipped)} not: {first})" if pairs.skipped else ""
        logger.info(f"weight pairs written by the optimizer step for {len(pairs.layers)} layers{skipped}")
    elif isinstance(engine, TorchEngine) and tc.weight_pairs_in_step and any(
            getattr(getattr(m, "recipe", None), "amax_history", 0) > 0 for m in model.modules()):
        # delayed scaling, where the pairs could have come from the step
        logger.info(f"weight pairs quantized in the forward: {engine.weight_pairs_why_not}")

    writer = CheckpointWriter(
        engine,
        ctx,
        ckpt_root,
        rc.checkpoint.enabled,
        rc.checkpoint.every,
        rc.checkpoint.keep_last,
        tc.steps,
        {"config": cfg_dict},
        logger,
    )
    telemetry = QuantTelemetry(model, every=rc.quant.telemetry_every)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    t0 = time.time()
    state = train_loop(engine, batches, val_batches, state, tc, ctx, autocast, logger, telemetry, writer)
    if not state.val_losses or state.val_losses[-1][0] != state.step:
        state.val_losses.append([state.step, evaluate(engine, val_batches, autocast, ctx)])

    val = state.val_losses[-1][1]
    tok_s = state.tokens_seen / state.train_seconds if state.train_seconds > 0 else 0.0
    # Steady state: the median logging interval after the first, which holds compilation/warm-up.
    rates = state.interval_rates[1:] or state.interval_rates
    steady = float(np.median(rates)) if rates else tok_s
    flops_tok = model.flops_per_token(tc.seq_len)
    util = mfu(flops_tok, steady, device_peak_flops(ctx.device), ctx.world)
    summary = {
        "step": state.step,
        "steps": tc.steps,
        "completed": state.step >= tc.steps,
        "final_val_loss": val,
        "val_ppl": math.exp(min(val, 50.0)),
        "final_train_loss": state.train_losses[-1][1] if state.train_losses else None,
        "tokens_per_s": tok_s,
        "tokens_per_s_steady": steady,
        "mfu": util,
        "peak_mem_bytes": peak_memory_bytes(ctx.device),
        "params": n_params,
        "world": ctx.world,
        "device": str(ctx.device),
        "precision": precision.value,
        "quant": rc.quant.recipe,
        "optim": cfg_dict["optim"]["name"],
        "dist": ctx.backend.value,
        # QuantLinear weights whose fp8 pairs the optimizer step wrote (0: quantized in the forward)
        "weight_pair_layers": len(pairs.layers) if pairs is not None else 0,
        "wall_seconds": time.time() - t0,
        "run_dir": str(run_dir.resolve()),
        "wandb_dir": logger.wandb_dir,
        "train_losses": state.train_losses,
        "val_losses": state.val_losses,
    }
    if ctx.is_main:
        tmp = run_dir / f".summary.json.tmp-{os.getpid()}"
        tmp.write_text(json.dumps(summary, indent=1))
        tmp.replace(run_dir / "summary.json")
        lines = [
            f"val loss {val:.4f}   perplexity {summary['val_ppl']:.2f}   step {state.step}/{tc.steps}",
            f"throughput {steady:,.0f} tokens/s (steady; {tok_s:,.0f} with warm-up)"
            + (f"   MFU {util:.1%}" if util is not None else "")
            + f"   peak memory {format_bytes(summary['peak_mem_bytes'])}",
            f"run written to {summary['run_dir']}",
        ]
        if logger.wandb_dir:
            lines.append(f"W&B files in {Path(logger.wandb_dir).parent}")
        logger.finish(summary)
        logger.info("[bold]summary[/bold]\n  " + "\n  ".join(lines))
    return summary
