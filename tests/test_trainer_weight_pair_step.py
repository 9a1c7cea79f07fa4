"""The optimizer step that writes the fp8 weight pairs (lowbit.trainer.weight_pair_step): a compiled
fp8_delayed Llama trained with it follows the same model trained with torch's fused AdamW and the
weights quantized in the forward; its forward reads the pairs the step wrote; the engine says when
it does not apply. Kernels in Triton's interpreter on the CPU, or on CUDA."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from lowbit.nn.convert import convert_model  # noqa: E402
from lowbit.nn.quant_linear import QuantLinear  # noqa: E402
from lowbit.optim.adamw import adam_scalars, adamw_math  # noqa: E402
from lowbit.trainer.grad_clip import clip_factor  # noqa: E402
from lowbit.trainer.weight_pair_step import W_ROW, WT_ROW, WeightPairStep, why_not_weight_pairs  # noqa: E402

DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]


def _llama(dev: str):  # noqa: ANN202
    from lowbit.nn.llama import Llama, LlamaConfig

    torch.manual_seed(0)
    # One block: its seven QuantLinear layers are the ones the step writes pairs for (each checked
    # below); a second block only doubled the compiles and the interpreted kernels.
    cfg = LlamaConfig(dim=64, n_layers=1, n_heads=2, n_kv_heads=1, max_seq_len=32, vocab_size=128)
    model = Llama(cfg)
    convert_model(model, "fp8_delayed")
    return model.to(dev), cfg


def _opt(model):  # noqa: ANN001, ANN202
    return torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1, fused=True)


def _loss_of(model, cfg, dev):  # noqa: ANN001, ANN202
    from lowbit.trainer.loss import LanguageModelLoss

    step = torch.compile(LanguageModelLoss(model))
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=torch.Generator().manual_seed(1)).to(dev)

    def loss():  # noqa: ANN202
        with torch.autocast(dev, dtype=torch.bfloat16):
            return step(tokens[:, :-1], tokens[:, 1:])

    return loss


def _train(model, cfg, dev, stepper, steps: int = 4) -> list[float]:  # noqa: ANN001
    loss_fn, out = _loss_of(model, cfg, dev), []
    for _ in range(steps):
        loss = loss_fn()
        loss.backward()
        stepper([p for p in model.parameters()], 0.5)  # a small max norm: clipping acts
        model.zero_grad(set_to_none=True)
        out.append(loss.item())
    return out


def _histories(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    return {n: m.amax_history.clone() for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.fixture
def uncached():
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


def _reference_step(model, opt):  # noqa: ANN001, ANN202
    # The same update with the weights quantized in the forward instead: the quantized layers'
    # weights by lowbit's fp32 AdamW (adamw_math, what the step's kernel computes), the rest by
    # torch's fused AdamW, both with the gradients divided by one clipping factor.
    qw = {id(m.weight) for m in model.modules() if isinstance(m, QuantLinear)}
    state, steps = {}, [0]

    def step(ps, max_norm):  # noqa: ANN001, ANN202
        norm = torch.nn.utils.get_total_norm([p.grad for p in ps])
        gs = clip_factor(norm, max_norm)
        steps[0] += 1
        g0 = opt.param_groups[0]
        sc = adam_scalars(g0["lr"], *g0["betas"], g0["eps"], g0["weight_decay"], steps[0])
        held = []
        with torch.no_grad():
            for p in ps:
                if id(p) in qw:
                    m, v = state.setdefault(id(p), (torch.zeros_like(p), torch.zeros_like(p)))
                    new_p, new_m, new_v = adamw_math(p, p.grad / gs, m, v, sc)
                    p.copy_(new_p), m.copy_(new_m), v.copy_(new_v)
                    held.append((p, p.grad))
                    p.grad = None
        opt.grad_scale = gs
        opt.step()
        del opt.grad_scale
        for p, g in held:
            p.grad = g

    return step


@pytest.mark.parametrize("dev", DEVICES)
def test_trains_as_the_forward_quantized_weights_and_reads_the_pairs(dev, uncached):
    # On the CPU the two runs are bit for bit alike (the same codes, the same updates); on CUDA
    # Inductor compiles the two forwards' other kernels apart, so they are compared closely.
    exact = dict(rtol=0, atol=0) if dev == "cpu" else dict(rtol=1e-4, atol=1e-5)
    ref_model, cfg = _llama(dev)
    torch._dynamo.reset()
    ref = _train(ref_model, cfg, dev, _reference_step(ref_model, _opt(ref_model)))

    model, _ = _llama(dev)
    opt = _opt(model)
    wps = WeightPairStep(model, opt)
    assert len(wps.layers) == 7 * cfg.n_layers and not wps.skipped
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    got = _train(model, cfg, dev, wps.clip_and_step)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert all(m.weight_pair_fresh for m in wps.layers)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(ref), **exact)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, **exact)
    # Each weight's amax joined its two history rows once a step, as the forward's quantizer does,
    # one step earlier: the last step recorded the weight the next forward will read (entry 0).
    # With the forward quantizing too, the rows would hold two entries a step.
    h, ref_h = _histories(model), _histories(ref_model)
    w_rows = [W_ROW, WT_ROW]
    for name in h:
        others = [r for r in range(6) if r not in w_rows]
        torch.testing.assert_close(h[name][others], ref_h[name][others], **exact)
        torch.testing.assert_close(h[name][w_rows, 1:], ref_h[name][w_rows, :-1], **exact)
        assert int((h[name][W_ROW] > 0).sum()) == 5 and int((ref_h[name][W_ROW] > 0).sum()) == 4
        assert torch.equal(h[name][W_ROW, 0], model.get_submodule(name).weight.abs().max())

    # The forward reads the pairs: spoiled codes change the loss. Invalidated, the forward (a
    # second compiled graph) quantizes the weights itself and ignores them: the loss is back, up to
    # the scale, whose history now holds the weight's own amax too.
    loss_fn = _loss_of(model, cfg, dev)
    with torch.no_grad():
        base = loss_fn().item()
        for m in wps.layers:
            m.weight_pair_codes.zero_()
        spoiled = loss_fn().item()
        assert spoiled != pytest.approx(base, rel=1e-2)
        wps.invalidate()
        assert not any(m.weight_pair_fresh for m in wps.layers)
        assert loss_fn().item() == pytest.approx(base, rel=2e-3)


def test_why_not_names_each_reason():
    lin = QuantLinear(16, 8, bias=False, recipe="fp8_tensorwise")
    assert "no delayed scaling" in why_not_weight_pairs(lin, {})
    lin = QuantLinear(16, 8, bias=False, recipe="fp8_delayed")
    assert "not in the optimizer" in why_not_weight_pairs(lin, None)
    assert "amsgrad" in why_not_weight_pairs(lin, {"amsgrad": True})
    lin.weight.requires_grad_(False)
    assert "trainable" in why_not_weight_pairs(lin, {})
    assert why_not_weight_pairs(QuantLinear(16, 8, bias=False, recipe="fp8_delayed"), {}) is None


def test_needs_torch_fused_adamw():
    model, _ = _llama("cpu")
    with pytest.raises(ValueError, match="fused=True"):
        WeightPairStep(model, torch.optim.AdamW(model.parameters(), fused=False))
    with pytest.raises(ValueError, match="AdamW"):
        WeightPairStep(model, torch.optim.SGD(model.parameters(), lr=0.1))


def test_engine_says_why_it_does_not_apply():
    from lowbit.trainer.config import DistBackend
    from lowbit.trainer.distributed import DistContext
    from lowbit.trainer.engines import TorchEngine

    model, _ = _llama("cpu")
    ctx = DistContext(0, 1, 0, torch.device("cpu"), DistBackend.none)
    eng = TorchEngine(model, _opt(model), ctx, 1, 1.0, False, weight_pairs_in_step=True)
    assert eng.weight_pairs is None and "not compiled" in eng.weight_pairs_why_not
    ctx2 = DistContext(0, 2, 0, torch.device("cpu"), DistBackend.none)
    eng = TorchEngine(model, _opt(model), ctx2, 1, 1.0, True, weight_pairs_in_step=True)
    assert eng.weight_pairs is None and "2 processes" in eng.weight_pairs_why_not


def test_ddp_leaves_the_pairs_out_of_its_buffer_broadcast(tmp_path):
    # DDP broadcasts rank 0's buffers before every forward; the pairs (a byte per weight element)
    # are written alike by every rank's step, so the engine keeps them out of that list, while
    # the amax histories stay in it. A real gloo group of one process.
    import torch.distributed as dist

    from lowbit.trainer.config import DistBackend
    from lowbit.trainer.distributed import DistContext
    from lowbit.trainer.engines import TorchEngine

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model, _ = _llama("cpu")
        ctx = DistContext(0, 1, 0, torch.device("cpu"), DistBackend.ddp)
        eng = TorchEngine(model, _opt(model), ctx, 1, 1.0, True, weight_pairs_in_step=True)
        assert eng.weight_pairs is not None and eng.ddp is not None
        eng.ddp._assign_modules_buffers()  # the list DDP's pre-forward broadcast walks
        synced = {id(b) for b in eng.ddp.modules_buffers}
        pairs = {id(b) for b in eng.weight_pairs.buffers()}
        assert len(pairs) == 6 * len(eng.weight_pairs.layers) > 0 and not pairs & synced
        assert {id(m.amax_history) for m in eng.weight_pairs.layers} <= synced
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("dev", DEVICES)
def test_a_moved_buffer_gets_a_new_table(dev):
    # The batched launches read addresses from a table; a buffer in new storage (model.to(), a load)
    # must be read there: with the old table the roll would read the old record word, and the
    # history would record 0 instead of the weight's amax.
    model, _ = _llama(dev)
    wps = WeightPairStep(model, _opt(model))
    params = list(model.parameters())
    g = torch.Generator().manual_seed(3)
    for step in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dev)
        if step == 1:
            for m in wps.layers:
                m.weight_pair_rec = torch.zeros_like(m.weight_pair_rec)
        wps.clip_and_step(params, 1.0)
    for m in wps.layers:
        assert torch.equal(m.amax_history[W_ROW, 0], m.weight.abs().max())
        assert int(m.weight_pair_rec) == 0


def test_restore_refuses_a_bad_state():
    model, _ = _llama("cpu")
    wps = WeightPairStep(model, _opt(model))
    with pytest.raises(ValueError, match="without a weight pair"):
        wps.restore({"no.such.layer": torch.tensor(1.0)})
    for m in wps.layers:  # as after a step
        m.weight_pair_fresh = True
    before = wps.layers[1].weight_pair_codes.clone()
    for bad in (torch.tensor(float("nan")), torch.tensor(-1.0), torch.ones(2), 1.0):
        # refused before anything is touched: the valid entry is not written, no pair invalidated
        with pytest.raises(ValueError, match="not one finite"):
            wps.restore({wps.names[1]: torch.tensor(5.0), wps.names[0]: bad})
        assert all(m.weight_pair_fresh for m in wps.layers)
        assert torch.equal(wps.layers[1].weight_pair_codes, before)


@pytest.mark.parametrize("dev", DEVICES)
def test_the_step_reads_the_param_groups_a_load_put_in(dev):
    # optimizer.load_state_dict replaces param_groups with new dicts, and the trainer's schedule
    # sets the lr in those: the step must read them (a stale group kept the lr of the save).
    model, _ = _llama(dev)
    opt = _opt(model)
    wps = WeightPairStep(model, opt)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.ones_like(p)
    wps.clip_and_step(params, 1.0)
    opt.load_state_dict(opt.state_dict())
    wps.invalidate()
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = [m.weight.clone() for m in wps.layers]
    for p in params:
        p.grad = torch.ones_like(p)
    wps.clip_and_step(params, 1.0)
    assert all(torch.equal(m.weight, w) for m, w in zip(wps.layers, before))


def test_a_load_without_the_pairs_says_the_run_differs(tmp_path):
    # A checkpoint whose step wrote the pairs, resumed where the forward quantizes (here: eager):
    # its histories already hold the last weight amaxes, so the run warns that it is not the same.
    from lowbit.trainer.checkpoint import save_torch
    from lowbit.trainer.config import DistBackend
    from lowbit.trainer.distributed import DistContext
    from lowbit.trainer.engines import WEIGHT_PAIRS_FILE, TorchEngine

    model, _ = _llama("cpu")
    ctx = DistContext(0, 1, 0, torch.device("cpu"), DistBackend.none)
    eng = TorchEngine(model, _opt(model), ctx, 1, 1.0, False, weight_pairs_in_step=True)
    assert eng.weight_pairs is None
    eng.save(tmp_path, {"step": 1})
    save_torch({"layers.0.attention.wq": torch.tensor(1.0)}, tmp_path / WEIGHT_PAIRS_FILE)
    with pytest.warns(UserWarning, match="not bit for bit"):
        eng.load(tmp_path)
