"""convert_model / apply_quant_config: name patterns, shared Parameters, config errors, ablations."""

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lowbit.nn import Llama, LlamaConfig, QuantLinear, apply_quant_config, convert_model
from lowbit.quant import RECIPES
from lowbit.quant.config import QuantConfig
from lowbit.quant.telemetry import QuantTelemetry

ROOT = Path(__file__).resolve().parents[1]


# Tiny tensors: extra OpenMP threads only add barrier waits (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


def _model():
    torch.manual_seed(0)
    return Llama(LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32))


def _names(model, cls):
    return {n for n, m in model.named_modules() if type(m) is cls}


def test_default_skips_lm_head_and_shares_parameters():
    model = _model()
    params = {n: p for n, p in model.named_parameters()}
    keys = set(model.state_dict())
    convert_model(model, "mxfp4")
    assert _names(model, nn.Linear) == {"lm_head"}
    assert len(_names(model, QuantLinear)) == 2 * 7
    assert all(p is params[n] for n, p in model.named_parameters())  # optimizers see the same tensors
    assert set(model.state_dict()) == keys  # checkpoints load across recipes
    assert isinstance(model.tok_embeddings, nn.Embedding)


def test_skip_patterns():
    model = convert_model(_model(), "fp8_tensorwise", skip=["lm_head", "layers.0.*", "w2"])
    assert _names(model, QuantLinear) == {
        f"layers.1.{n}" for n in ("attention.wq", "attention.wk", "attention.wv", "attention.wo")
    } | {"layers.1.feed_forward.w1", "layers.1.feed_forward.w3"}
    everything = convert_model(_model(), "int8", skip=[])
    assert "lm_head" in _names(everything, QuantLinear)


def test_bf16_leaves_model_untouched():
    model = _model()
    assert convert_model(model, "bf16") is model and not _names(model, QuantLinear)
    assert apply_quant_config(model, QuantConfig(recipe="bf16")) is model


def test_apply_quant_config_overrides():
    model = apply_quant_config(
        _model(), QuantConfig(recipe="mxfp4", hadamard=[], stochastic_rounding=["wgrad"])
    )
    r = model.layers[0].attention.wq.recipe
    assert r.dgrad.hadamard == 0 and r.wgrad.hadamard == 0
    assert not r.dgrad.stochastic and r.wgrad.stochastic
    r2 = apply_quant_config(_model(), QuantConfig(recipe="nvfp4", hadamard=["dgrad", "wgrad"])).lm_head
    assert isinstance(r2, nn.Linear)
    model = apply_quant_config(_model(), QuantConfig(recipe="nvfp4", hadamard=["dgrad", "wgrad"], skip=[]))
    r3 = model.lm_head.recipe
    assert r3.dgrad.hadamard == 16 and r3.wgrad.hadamard == 16 and r3.fprop.hadamard == 0


@pytest.mark.parametrize(
    "cfg, match",
    [
        (QuantConfig(recipe="mxfp5"), "mxfp5.*valid choices.*mxfp4"),
        (QuantConfig(recipe="mxfp4", hadamard=["bwd"]), "bwd.*valid choices.*fprop, dgrad, wgrad"),
        (QuantConfig(recipe="mxfp4", backend="cutlass"), "cutlass.*valid choices.*emulate"),
        (QuantConfig(recipe="mxfp4", hadamard_block=24), "hadamard_block=24.*power of two"),
    ],
)
def test_config_errors_name_value_and_choices(cfg, match):
    with pytest.raises(ValueError, match=match):
        apply_quant_config(_model(), cfg)


def test_every_recipe_has_a_config_file_and_back():
    files = {p.stem: OmegaConf.load(p) for p in (ROOT / "configs" / "quant").glob("*.yaml")}
    assert set(files) == set(RECIPES)
    assert all(cfg.recipe == name for name, cfg in files.items())


def test_exp_configs_name_known_recipes():
    exps = list((ROOT / "configs" / "exp").glob("*.yaml"))
    named = set()
    for p in exps:
        text = p.read_text()
        for line in text.splitlines():
            if "override /quant:" in line:
                named.add(line.split(":", 1)[1].strip())
    assert named and named <= set(RECIPES)
    assert set(RECIPES) - {"bf16"} <= named  # one experiment file per recipe


@pytest.mark.parametrize("name", [n for n in RECIPES if n != "bf16"])
def test_training_step_every_recipe(name):
    model = convert_model(_model(), name)
    tokens = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(0))
    loss = nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_telemetry_sampled_steps_only():
    model = convert_model(_model(), "mxfp4")
    tel = QuantTelemetry(model, every=2)
    tokens = torch.randint(0, 256, (2, 32))
    out = []
    for step in range(2):
        tel.start_step(step)
        model(tokens).sum().backward()
        out.append(tel.end_step())
    m = out[0]
    assert out[1] == {}
    for op in ("fprop_x", "fprop_w", "dgrad_dy", "dgrad_w", "wgrad_dy", "wgrad_x"):
        sqnr = m[f"quant/layers.0.attention.wq/{op}/sqnr_db"]
        assert 8 < sqnr < 30  # fp4 with 32-blocks: ~15-20 dB
        assert 0 <= m[f"quant/layers.0.attention.wq/{op}/clip_frac"] <= 1
    assert all(m.observer is None for _, m in tel.layers)
    assert "worst" in tel.summary()


def test_telemetry_ranks_formats():
    def mean_sqnr(recipe):
        model = convert_model(_model(), recipe)
        tel = QuantTelemetry(model, every=1)
        tel.start_step(0)
        model(torch.randint(0, 256, (2, 32))).sum().backward()
        vals = [v for k, v in tel.end_step().items() if k.endswith("sqnr_db")]
        return sum(vals) / len(vals)

    assert mean_sqnr("int8") > mean_sqnr("mxfp8") > mean_sqnr("mxfp4") + 8
