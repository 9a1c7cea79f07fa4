"""The optim= config group: factory, validation, YAML files, exact state_dict round trip."""

import copy
import io
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lowbit.optim import OptimConfig, build_optimizer, wants_bf16_params
from lowbit.optim.adamw import LowBitAdamW

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "optim"
NAMES = ["adamw", "adamw8bit", "adamw4bit", "adamw_bf16_sr", "shampoo", "shampoo4bit"]


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 64)
        self.fc = torch.nn.Linear(64, 96)
        self.norm = torch.nn.LayerNorm(96)
        self.out = torch.nn.Linear(96, 40, bias=False)

    def forward(self, idx):
        return self.out(self.norm(torch.relu(self.fc(self.emb(idx)))))


def _cfg(name, **over):
    base = OmegaConf.structured(OptimConfig)
    return OmegaConf.merge(base, OmegaConf.load(CONFIG_DIR / f"{name}.yaml"), over)


@pytest.mark.parametrize("name", NAMES)
def test_yaml_builds_optimizer_with_base_lr_and_no_decay_groups(name):
    torch.manual_seed(0)
    model = Tiny()
    if wants_bf16_params(_cfg(name)):
        model = model.bfloat16()
    opt = build_optimizer(model, _cfg(name, min_quant_numel=1024))
    assert isinstance(opt, torch.optim.Optimizer)
    assert all(g["base_lr"] == g["lr"] == 3e-3 for g in opt.param_groups)
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    assert id(model.fc.weight) in decayed and id(model.out.weight) in decayed
    assert id(model.emb.weight) not in decayed and id(model.fc.bias) not in decayed
    assert opt.param_groups[1]["weight_decay"] == 0.0
    idx = torch.randint(0, 40, (8, 5))
    before = model.out.weight.detach().clone()
    for _ in range(2):
        loss = model(idx).float().logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(before, model.out.weight)


def test_wants_bf16_params():
    assert wants_bf16_params(_cfg("adamw_bf16_sr"))
    assert wants_bf16_params(_cfg("adamw_bf16_sr", bf16_rounding="nearest"))  # the lossy baseline
    assert not wants_bf16_params(_cfg("adamw8bit"))
    assert wants_bf16_params(_cfg("adamw8bit", bf16_rounding="kahan"))


@pytest.mark.parametrize(
    "over,key",
    [
        (dict(lr=-1.0), "lr"),
        (dict(betas=[0.9, 1.5]), "betas"),
        (dict(eps=0.0), "eps"),
        (dict(inverse_every=0), "inverse_every"),
        (dict(precond_bits=16), "precond_bits"),
        (dict(shampoo_beta=0.0), "shampoo_beta"),
        (dict(eigvec_block=3), "eigvec_block"),
        (dict(min_quant_numel=0), "min_quant_numel"),
    ],
)
def test_bad_values_name_the_key_and_range(over, key):
    with pytest.raises(ValueError, match=rf"optim\.{key}=.*valid"):
        build_optimizer(Tiny(), _cfg("adamw8bit", **over))


def test_bad_name_and_rounding_list_choices():
    cfg = OptimConfig()
    cfg.name = "adamw3bit"
    with pytest.raises(ValueError, match="adamw8bit"):
        build_optimizer(Tiny(), cfg)
    cfg = OptimConfig()
    cfg.bf16_rounding = "up"
    with pytest.raises(ValueError, match=r"bf16_rounding='up'.*stochastic"):
        build_optimizer(Tiny(), cfg)


def _train(model, opt, steps, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, 40, (8, 5), generator=g)
        loss = model(idx).float().logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _roundtrip(sd):
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name,over", [("adamw8bit", {}), ("adamw4bit", {}), ("adamw_bf16_sr", {}),
                                       ("adamw_bf16_sr", {"bf16_rounding": "kahan"}),
                                       ("adamw8bit", {"bf16_rounding": "stochastic"}),
                                       ("shampoo", {}), ("shampoo4bit", {})])
def test_state_dict_round_trip_resumes_bitwise(name, over):
    cfg = _cfg(name, min_quant_numel=1024, inverse_every=2, **over)
    torch.manual_seed(0)
    model = Tiny()
    if wants_bf16_params(cfg):
        model = model.bfloat16()
    opt = build_optimizer(model, cfg)
    _train(model, opt, 3, seed=1)
    ckpt_model = copy.deepcopy(model.state_dict())
    ckpt_opt = _roundtrip(opt.state_dict())
    _train(model, opt, 3, seed=2)

    torch.manual_seed(123)
    resumed = Tiny().to(next(model.parameters()).dtype)
    resumed.load_state_dict(ckpt_model)
    opt2 = build_optimizer(resumed, cfg)
    opt2.load_state_dict(ckpt_opt)
    _train(resumed, opt2, 3, seed=2)
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    sd1, sd2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for k in sd1:
        for key, val in sd1[k].items():
            other = sd2[k][key]
            assert torch.equal(val, other) if torch.is_tensor(val) else val == other, key


def test_load_keeps_fp32_scales_for_bf16_params():
    w = torch.nn.Parameter(torch.randn(64, 128).bfloat16())
    opt = LowBitAdamW([w], state_bits=8)
    w.grad = torch.randn_like(w)
    opt.step()
    opt2 = LowBitAdamW([w], state_bits=8)
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    assert opt2.state[w]["exp_avg_absmax"].dtype == torch.float32
    assert torch.equal(opt2.state[w]["exp_avg_absmax"], opt.state[w]["exp_avg_absmax"])


def test_optimizers_import_and_step_without_triton():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['triton'] = None\n"  # an import of triton now raises ImportError
        "import torch\n"
        "from lowbit.optim import AdamW4bit, build_optimizer, OptimConfig\n"
        "p = torch.nn.Parameter(torch.randn(64, 128)); o = AdamW4bit([p]); p.grad = torch.randn_like(p)\n"
        "o.step(); assert 'lowbit.kernels.optim_adamw_lowbit' not in sys.modules\n"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=120)


@pytest.mark.parametrize("exp,name,bf16", [("optim_8bit_bf16", "adamw8bit", True),
                                           ("optim_shampoo4bit_ddp", "shampoo4bit", False)])
def test_exp_configs_compose(exp, name, bf16):
    from conftest import compose

    cfg = compose([f"+exp={exp}"])
    assert getattr(cfg.optim.name, "value", cfg.optim.name) == name
    assert wants_bf16_params(cfg.optim) is bf16
    opt = build_optimizer(Tiny(), cfg.optim)
    assert opt.param_groups[0]["base_lr"] == cfg.optim.lr
