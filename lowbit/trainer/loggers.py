"""Where metrics go: a console progress bar and/or Weights & Biases. Only rank 0 logs."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from lowbit.trainer.config import LoggerConfig, LoggerKind, WandbMode


def wandb_mode(mode: WandbMode | str) -> str:
    mode = WandbMode(mode)
    if mode is WandbMode.auto:
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode.value


def check_logger_available(cfg: LoggerConfig) -> None:
    """Fail before any work when the configured logger needs wandb (an optional package) and it
    does not import, instead of after the run directory was made and the model built."""
    kind = LoggerKind(cfg.kind)
    if kind not in (LoggerKind.wandb, LoggerKind.both):
        return
    try:
        import wandb  # noqa: F401
    except ImportError as e:
        valid = ", ".join(k.value for k in LoggerKind)
        raise ImportError(
            f"logger.kind={kind.value} needs the wandb package, which did not import ({e}): "
            f"install it (pip install 'wandb>=0.17') or pick a logger.kind without it (valid: {valid})"
        ) from e


class RunLogger:
    def __init__(
        self,
        cfg: LoggerConfig,
        run_dir: Path,
        run_config: dict[str, Any],
        enabled: bool,
        total_steps: int,
        start_step: int,
        wandb_id: str | None,
    ) -> None:
        self.enabled = enabled
        self.kind = LoggerKind(cfg.kind)
        self.console = Console(stderr=False, highlight=False)
        self.wandb_run = None
        self.progress: Progress | None = None
        if not enabled:
            return
        if self.kind in (LoggerKind.wandb, LoggerKind.both):
            import wandb

            self.wandb_run = wandb.init(
                project=cfg.project,
                entity=cfg.entity,
                tags=list(cfg.tags),
                mode=wandb_mode(cfg.mode),
                dir=str(run_dir),
                config=run_config,
                name=run_dir.name,
                id=wandb_id,
                resume="allow",
                settings=wandb.Settings(console="off", silent=True),
            )
        if cfg.progress and self.kind in (LoggerKind.console, LoggerKind.both):
            self.progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
            self.progress.start()
        self._t0 = time.time()

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    @property
    def wandb_dir(self) -> str | None:
        return self.wandb_run.dir if self.wandb_run is not None else None

    def info(self, msg: str) -> None:
        if self.enabled:
            self.console.print(msg)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if self.progress is not None:
            self.progress.update(
                self.task,
                completed=step,
                info=f"loss {loss:.4f}  lr {lr:.2e}  {tokens_per_s:,.0f} tok/s",
            )

    def log(self, metrics: dict[str, float], step: int, echo: bool = True) -> None:
        if not self.enabled:
            return
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)
        # Per-layer quantization telemetry goes to W&B only; the console gets its one-line summary.
        if (echo or self.progress is None) and self.kind is not LoggerKind.wandb:
            self.info(
                f"step {step:>6} | "
                + " | ".join(_fmt(k, v) for k, v in metrics.items() if not k.startswith("quant/"))
            )

    def finish(self, summary: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.stop()
        if self.wandb_run is not None:
            for k, v in summary.items():
                if isinstance(v, (int, float, str)):
                    self.wandb_run.summary[k] = v
            self.wandb_run.finish()


def _fmt(key: str, value: float) -> str:
    if isinstance(value, float):
        if key.endswith(("lr", "epoch")) or abs(value) < 1e-2:
            return f"{key} {value:.3g}"
        return f"{key} {value:,.4f}" if abs(value) < 1e3 else f"{key} {value:,.0f}"
    return f"{key} {value}"
