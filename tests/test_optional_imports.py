"""lowbit imports and trains without triton, deepspeed or wandb when they are not used."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT, SMALL

SCRIPT = f"""
import sys
for name in ("triton", "deepspeed", "wandb"):
    sys.modules[name] = None  # any import of it now raises ImportError
sys.path.insert(0, {str(ROOT)!r})
sys.path.insert(0, {str(ROOT / "tests")!r})
import lowbit, lowbit.nn, lowbit.quant, lowbit.optim, lowbit.kernels, lowbit.trainer.run
from conftest import compose
from lowbit.trainer.run import run
s = run(compose({SMALL!r} + ["train.steps=2", "out_dir=" + sys.argv[1], "run_name=noopt",
                               "quant=mxfp8", "optim=adamw8bit"]))
print("STEPS", s["step"])
"""


def test_imports_and_trains_without_optional_packages(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STEPS 2" in proc.stdout
