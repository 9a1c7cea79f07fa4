"""LOWBIT_* switches (0 or 1) read through lowbit.env_flags.env_flag: the helper's rule, and every
module that reads one wired to its variable."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lowbit.env_flags import env_flag

# (module, variable, attribute, default)
FLAGS = (
    ("lowbit.kernels.column_quantize", "LOWBIT_COLUMN_QUANTIZE", "ENABLED", True),
    ("lowbit.kernels.column_quantize", "LOWBIT_COLUMN_FOLD", "FOLD_ENABLED", True),
    ("lowbit.kernels.fast_launch", "LOWBIT_FAST_LAUNCH", "ENABLED", True),
    ("lowbit.kernels.leverage", "LOWBIT_LEVERAGE_KERNELS", "ENABLED", True),
    ("lowbit.kernels.scale_fold", "LOWBIT_MX_FP8", "ENABLED", True),
    ("lowbit.kernels.pair_quantize", "LOWBIT_PAIR_SHARE", "SHARE_CODES", False),
    ("lowbit.kernels.pair_quantize", "LOWBIT_PAIR_GROUPS", "GROUPS_ON_CUDA", True),
    ("lowbit.kernels.pair_quantize", "LOWBIT_PAIR_ROWS", "ROWS_ON_CUDA", True),
    ("lowbit.kernels.quantize", "LOWBIT_ROTATED_STRIDED", "ROTATED_STRIDED_READ", False),
    ("lowbit.nn.gradient_cast_fold", "LOWBIT_FOLD_GRAD_CAST", "ENABLED", True),
    ("lowbit.nn.norm_pair_fold", "LOWBIT_FOLD_NORM_PAIR", "ENABLED", True),
    ("lowbit.nn.quant_linear_traced", "LOWBIT_TRITON_OP", "USE_TRITON_OP", False),
    ("lowbit.nn.quant_linear_values", "LOWBIT_PAIR_VALUES", "ON", True),
)


def test_env_flag_reads_0_or_1_and_names_a_bad_value(monkeypatch):
    monkeypatch.delenv("LOWBIT_TEST_FLAG", raising=False)
    assert env_flag("LOWBIT_TEST_FLAG", True) is True and env_flag("LOWBIT_TEST_FLAG", False) is False
    for value, on in (("0", False), ("1", True)):
        monkeypatch.setenv("LOWBIT_TEST_FLAG", value)
        assert env_flag("LOWBIT_TEST_FLAG", not on) is on
    for bad in ("true", "on", "", " 1"):
        monkeypatch.setenv("LOWBIT_TEST_FLAG", bad)
        with pytest.raises(ValueError, match=f"LOWBIT_TEST_FLAG={bad!r}; valid choices: 0, 1"):
            env_flag("LOWBIT_TEST_FLAG", True)


def _read_all(values: dict[str, str]) -> dict[str, bool]:
    # Every flag's attribute after importing its module with `values` in the environment (one
    # fresh interpreter: the flags are read at import).
    env = {k: v for k, v in os.environ.items() if not k.startswith("LOWBIT_")} | values
    code = ("import importlib, json, sys; flags = json.loads(sys.argv[1]); print(json.dumps("
            "[getattr(importlib.import_module(m), a) for m, _, a, _ in flags]))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(FLAGS)], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return dict(zip((v for _, v, _, _ in FLAGS), json.loads(out.stdout.strip().splitlines()[-1])))


def test_every_flag_reads_its_variable():
    # Unset: each default. Each set to the other value: each attribute follows its own variable.
    assert _read_all({}) == {v: d for _, v, _, d in FLAGS}
    assert _read_all({v: "0" if d else "1" for _, v, _, d in FLAGS}) == {v: not d for _, v, _, d in FLAGS}
