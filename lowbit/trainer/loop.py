"""The training loop: one screen, read top to bottom."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from lowbit.trainer.data import BatchSource
from lowbit.trainer.distributed import DistContext, all_reduce_sum


def lr_multiplier(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to `min_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup - 1)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(engine, batches, autocast, ctx: DistContext) -> float:
    engine.model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    for x, y in batches:
        x, y = x.to(ctx.device), y.to(ctx.device)
        with autocast():
            loss = engine.loss(x, y)
        total += torch.stack([loss.double() * y.numel(), torch.tensor(y.numel(), device=ctx.device)])
    engine.model.train()
    all_reduce_sum(total, ctx)
    return float(total[0] / total[1])


@dataclass
class LoopState:
    step: int
    train_losses: list = field(default_factory=list)  # [step, loss averaged over ranks]
    val_losses: list = field(default_factory=list)  # [step, val loss]
    tokens_seen: int = 0
    train_seconds: float = 0.0
    interval_rates: list = field(default_factory=list)  # tokens/s of each logging interval (this process)


def train_loop(
    engine,
    batches: BatchSource,
    val_batches,
    state: LoopState,
    tc,
    ctx: DistContext,
    autocast,
    logger,
    telemetry,
    save_checkpoint,
) -> LoopState:
    """Run optimizer steps from state.step to tc.steps (or tc.stop_after steps in this process)."""
    tokens_per_step = batches.global_batch * tc.seq_len
    pending: list[torch.Tensor] = []  # per-step losses not yet synced to the host
    stop_at = min(tc.steps, state.step + tc.stop_after) if tc.stop_after > 0 else tc.steps
    t_last = time.perf_counter()
    while state.step < stop_at:
        step = state.step
        for g in engine.optimizer.param_groups:
            g["lr"] = g["base_lr"] * lr_multiplier(step, tc.steps, tc.warmup_steps, tc.min_lr_ratio)
        telemetry.start_step(step)
        step_loss = torch.zeros((), device=ctx.device)
        for micro in range(tc.grad_accum):
            x, y = batches.get(step, micro)
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with engine.micro_context(last=micro == tc.grad_accum - 1):
                with autocast():
                    loss = engine.loss(x, y)
                engine.backward(loss)
            step_loss += loss.detach() / tc.grad_accum
        grad_norm = engine.step()
        quant_metrics = telemetry.end_step()
        pending.append(step_loss)
        state.step += 1
        state.tokens_seen += tokens_per_step

        is_log = state.step % tc.log_every == 0 or state.step == stop_at
        is_eval = tc.eval_every > 0 and (state.step % tc.eval_every == 0 or state.step == tc.steps)
        is_ckpt = save_checkpoint.due(state.step, stop_at)
        if is_log or is_eval or is_ckpt or quant_metrics:
            losses = all_reduce_sum(torch.stack(pending), ctx) / ctx.world
            first = state.step - len(pending) + 1
            state.train_losses += [[first + i, v] for i, v in enumerate(losses.tolist())]
            pending.clear()
            now = time.perf_counter()
            state.train_seconds += now - t_last
            span_tokens = tokens_per_step * len(losses)
            tok_s = span_tokens / max(now - t_last, 1e-9)
            state.interval_rates.append(tok_s)
            last = state.train_losses[-1][1]
            if not math.isfinite(last):
                raise FloatingPointError(
                    f"training loss became {last} at step {state.step}; stopping without writing a checkpoint"
                )
            lr = engine.optimizer.param_groups[0]["lr"]
            logger.update(state.step, last, lr, tok_s)
            metrics = {
                "train/loss": last,
                "train/lr": lr,
                "train/grad_norm": float(grad_norm),
                "perf/tokens_per_s": tok_s,
                "train/epoch": batches.epoch_of(state.step),
            }
            metrics.update(quant_metrics)
            if is_eval:
                val = evaluate(engine, val_batches, autocast, ctx)
                state.val_losses.append([state.step, val])
                metrics["val/loss"] = val
                metrics["val/ppl"] = math.exp(min(val, 50.0))
            logger.log(metrics, state.step, echo=is_eval)
            if quant_metrics:
                logger.info(telemetry.summary())
            if is_ckpt:
                save_checkpoint(state)
            t_last = time.perf_counter()
    return state
