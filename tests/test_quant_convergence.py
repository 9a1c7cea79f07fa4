"""benchmarks/convergence.py: variant lists, the table, and one real two-variant run."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("convergence", ROOT / "benchmarks" / "convergence.py")
conv = importlib.util.module_from_spec(_spec)
sys.modules["convergence"] = conv
_spec.loader.exec_module(conv)


def _args(argv):
    import argparse

    p = argparse.ArgumentParser()
    for a in ("--recipes", "--optims"):
        p.add_argument(a, default="")
    p.add_argument("--ablations", action="store_true")
    p.add_argument("--variant", action="append")
    return p.parse_args(argv)


def test_variants_from_recipes_ablations_optims_and_custom():
    v = conv.build_variants(
        _args(
            [
                "--recipes",
                "bf16,mxfp4",
                "--ablations",
                "--optims",
                "adamw8bit",
                "--variant",
                "x:optim.lr=1e-2",
            ]
        )
    )
    labels = [lbl for lbl, _ in v]
    assert labels[:2] == ["bf16", "mxfp4"] and "mxfp4_no_hadamard" in labels and "mxfp4_no_sr" in labels
    assert ("adamw8bit", ["optim=adamw8bit"]) in v and ("x", ["optim.lr=1e-2"]) in v
    with pytest.raises(SystemExit, match="duplicate"):
        conv.build_variants(_args(["--recipes", "bf16,bf16"]))


def test_table_gap_and_targets():
    rows = [
        {"label": "bf16", "overrides": [], "final_val_loss": 2.0, "status": "ok"},
        {"label": "mxfp4", "overrides": ["quant=mxfp4"], "final_val_loss": 2.06, "status": "ok"},
        {"label": "nvfp4", "overrides": ["quant=nvfp4"], "status": "failed (rc=1)"},
    ]
    t = conv.table(rows)
    assert "+3.00%" in t and "≤ 2.0% (missed)" in t and "failed (rc=1)" in t


@pytest.mark.slow
def test_two_variant_run_writes_table_and_json(tmp_path):
    tiny = (
        "train.steps=2 train.eval_every=2 train.eval_batches=1 train.micro_batch_size=2 train.seq_len=32 "
        "model.dim=32 model.n_layers=1 data.max_bytes=200000 checkpoint.every=0"
    )
    argv = ["--recipes", "bf16,mxfp4", "--seeds", "1,2", "--set", tiny, "--out", str(tmp_path), "--jobs", "4"]
    assert conv.main(argv) == 0
    meta = json.loads((tmp_path / "convergence.json").read_text())
    assert [r["label"] for r in meta["results"]] == ["bf16", "mxfp4"]
    for r in meta["results"]:
        assert r["status"] == "ok" and r["final_val_loss"] > 0 and r["train_losses"]
        assert r["seeds"] == [1, 2] and len(r["per_seed_final_val_loss"]) == 2 and "final_val_loss_std" in r
        assert all("train.seed=" in run["command"] for run in r["runs"])
    assert (
        "| mxfp4 |" in (tmp_path / "convergence.md").read_text()
        and "(2 seeds)" in (tmp_path / "convergence.md").read_text()
    )
