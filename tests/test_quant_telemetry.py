"""QuantTelemetry's console summary with non-finite operands."""

import math
import re

import pytest
import torch
from torch import nn

from lowbit.nn import QuantLinear
from lowbit.quant.telemetry import QuantTelemetry

# Tiny tensors: extra OpenMP threads only add barrier waits (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


def test_summary_mean_sqnr_ignores_non_finite_operands_and_counts_them():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {"a": QuantLinear(32, 16, recipe="mxfp8"), "b": QuantLinear(32, 16, recipe="mxfp8")}
    )
    tel = QuantTelemetry(model, every=1)
    tel.start_step(0)
    with torch.no_grad():
        model["a"](torch.randn(4, 32))
        x = torch.randn(4, 32)
        x[1, 3] = float("nan")
        model["b"](x)
    metrics = tel.end_step()
    sqnr = {k: v for k, v in metrics.items() if k.endswith("sqnr_db")}
    assert len(sqnr) == 4 and math.isnan(sqnr["quant/b/fprop_x/sqnr_db"])
    finite = [min(v, 200.0) for v in sqnr.values() if not math.isnan(v)]
    line = tel.summary()
    m = re.search(r"mean SQNR (\S+)dB over 3 operands \(1 non-finite", line)
    assert m, line
    assert float(m.group(1)) == pytest.approx(sum(finite) / 3, abs=0.051)
    assert "b/fprop_x nandB" in line.split("worst:")[1].split(";")[0]  # the non-finite one ranks worst


def test_summary_all_finite_reports_zero_non_finite():
    torch.manual_seed(0)
    model = nn.ModuleDict({"a": QuantLinear(32, 16, recipe="mxfp8")})
    tel = QuantTelemetry(model, every=1)
    tel.start_step(0)
    with torch.no_grad():
        model["a"](torch.randn(4, 32))
    vals = [v for k, v in tel.end_step().items() if k.endswith("sqnr_db")]
    line = tel.summary()
    assert f"mean SQNR {sum(vals) / len(vals):.1f}dB over 2 operands (0 non-finite" in line, line
