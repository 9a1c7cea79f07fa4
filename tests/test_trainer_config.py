"""The Hydra structured config: every file composes, and bad keys/values fail before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, compose
from omegaconf import OmegaConf

from lowbit.trainer.config import RunConfig, check_overrides

GROUPS = ["model", "data", "quant", "optim", "dist", "logger"]


def test_default_composes_to_the_schema():
    cfg = compose([])
    rc = OmegaConf.to_object(cfg)
    assert isinstance(rc, RunConfig)
    assert rc.model.name == "tiny" and rc.data.kind.value == "stdlib" and rc.quant.recipe == "bf16"


@pytest.mark.parametrize("exp", sorted(p.stem for p in (ROOT / "configs" / "exp").glob("*.yaml")))
def test_every_exp_file_composes(exp):
    first = (ROOT / "configs" / "exp" / f"{exp}.yaml").read_text().splitlines()[0]
    assert first.strip() == "# @package _global_", (
        f"configs/exp/{exp}.yaml must start with '# @package _global_'"
    )
    OmegaConf.to_object(compose([f"+exp={exp}"]))


def _group_options():
    for group in GROUPS:
        for f in sorted((ROOT / "configs" / group).glob("*.yaml")):
            yield group, f.stem


# The field of each group that names the option it came from.
IDENTITY = {
    "model": "name",
    "data": "kind",
    "quant": "recipe",
    "optim": "name",
    "dist": "backend",
    "logger": "kind",
}


@pytest.mark.parametrize("group,option", list(_group_options()))
def test_every_group_option_composes(group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option != "stdlib":
        overrides.append("data.path=/somewhere")  # those options require a path
    rc = OmegaConf.to_object(compose(overrides))
    value = getattr(getattr(rc, group), IDENTITY[group])
    assert getattr(value, "value", value) == option


def test_override_typo_names_the_key_and_the_valid_ones():
    msg = check_overrides(["train.stpes=10"])
    assert "train.stpes" in msg and "'steps'" in msg and "warmup_steps" in msg
    assert check_overrides(["train.steps=10", "model=125m", "+exp=x", "hydra.run.dir=x"]) is None
    assert "lr" in check_overrides(["optim.lrr=1"])


def _chain(exc: BaseException) -> str:
    parts = []
    while exc is not None:
        parts.append(str(exc))
        exc = exc.__cause__ or exc.__context__
    return "\n".join(parts)


def test_wrong_type_and_bad_choice_are_rejected():
    with pytest.raises(Exception) as e:
        compose(["train.steps=many"])
    assert "train.steps" in _chain(e.value)
    with pytest.raises(Exception) as e:
        compose(["data.kind=parquet"])
    assert "expected one of [stdlib, text_dir, bin, jsonl]" in _chain(e.value)
    with pytest.raises(Exception) as e:
        compose(["train.compile_mode=fast"])
    modes = "default, reduce_overhead, max_autotune, max_autotune_no_cudagraphs"
    assert f"expected one of [{modes}]" in _chain(e.value)
    with pytest.raises(Exception) as e:
        compose(["model=huge"])
    assert "tiny" in _chain(e.value) and "125m" in _chain(e.value)  # the group's available options


def test_cli_typo_fails_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "train.stpes=10", f"out_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "train.stpes" in proc.stderr and "Did you mean 'steps'" in proc.stderr
    assert not any(Path(tmp_path).iterdir())


def test_bad_values_are_clear_errors(small_run):
    with pytest.raises(ValueError, match="train.seq_len=512 exceeds model.max_seq_len=256"):
        small_run(["train.seq_len=512", "run_name=x"])
    with pytest.raises(ValueError, match="not divisible"):
        small_run(["model.n_heads=3", "run_name=x"])
    with pytest.raises(ValueError, match="zero_stage=5"):
        small_run(["dist=deepspeed", "dist.zero_stage=5", "run_name=x"])


def test_wandb_logger_without_wandb_fails_before_any_work(small_run, tmp_path, monkeypatch):
    # wandb is optional: asking for it where it does not import names the setting and the way out,
    # before the run directory exists.
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import of it now raises ImportError
    for kind in ("wandb", "both"):
        with pytest.raises(ImportError, match=f"logger.kind={kind} needs the wandb package.*console"):
            small_run([f"logger.kind={kind}", "run_name=x"])
    assert not any(Path(tmp_path).iterdir())


def test_more_ranks_than_world_without_dist_is_an_error(small_run, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="dist=ddp"):
        small_run(["run_name=x"])


def test_cuda_requested_without_gpu_is_an_error():
    import torch

    from lowbit.trainer.distributed import pick_device

    if torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="nproc_per_node"):
            pick_device("auto", local_rank=torch.cuda.device_count(), world=torch.cuda.device_count() + 1)
    else:
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            pick_device("cuda", local_rank=0, world=1)
