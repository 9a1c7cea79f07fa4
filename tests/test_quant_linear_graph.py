"""QuantLinear as graph ops under torch.compile (lowbit.nn.quant_linear_graph): recipes with per-call
seeds or block formats compile without graph breaks; given the same seeds the ops compute what the
eager layer's building blocks compute, bit for bit; the seeds come from a device counter that
advances once per call; the kernels read seeds from the device as the same bits as host ints."""

import os

import pytest
import torch
from torch import nn

from lowbit.nn import QuantLinear, convert_model, quant_linear_graph
from lowbit.nn.quant_linear_graph import graph_quant_linear, next_graph_seeds, recipe_key, why_not_graph
from lowbit.quant import RECIPES
from lowbit.quant.gemm import OperandPlan, derive_seed, gemm_operands, prepare_operand_pair
from lowbit.quant.quantize import QuantSpec
from lowbit.quant.rounding import DeviceSeed, seed_offset, seed_table

pytestmark = pytest.mark.usefixtures("single_thread", "graph_ops_on")
K, N, T = 64, 96, 48
GRAPH_RECIPES = ["mxfp4", "nvfp4", "mxfp8", "int8", "int4_hq", "fp8_blockwise"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# Tests whose kernels run on CPU tensors in Triton's interpreter (set by conftest without a GPU);
# on a GPU machine the interpreter is off and the gpu tests below cover the same on CUDA.
INTERPRETED = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors through Triton's interpreter"
)


def test_graph_ops_are_off_by_default(monkeypatch):
    from lowbit.nn import quant_linear_graph

    monkeypatch.setattr(quant_linear_graph, "MODE", "0")
    assert "off" in why_not_graph(RECIPES["mxfp4"])


def test_which_recipes_run_as_graph_ops():
    graph = [n for n, r in RECIPES.items() if not r.is_identity and why_not_graph(r) is None]
    assert "fp8_delayed" not in graph and set(GRAPH_RECIPES) <= set(graph)
    assert "delayed scaling is traced" in why_not_graph(RECIPES["fp8_delayed"])
    assert "user-registered" in why_not_graph(RECIPES["mxfp4"], "my_backend")


def _building_blocks(layer, x2, gy, seeds):
    # The eager layer's steps (lowbit.nn.quant_linear._QuantLinearFn) with the seeds as host ints.
    r, (s_f, s_d, s_w) = layer.recipe, seeds
    w, b = layer.weight.detach(), None if layer.bias is None else layer.bias.detach()
    a, x_t = prepare_operand_pair(
        x2, OperandPlan(r.fprop.a, r.fprop, s_f, 1), OperandPlan(r.wgrad.b, r.wgrad, s_w, 2)
    )
    bq, w_t = prepare_operand_pair(
        w, OperandPlan(r.fprop.b, r.fprop, s_f, 2), OperandPlan(r.dgrad.b, r.dgrad, s_d, 2)
    )
    y = gemm_operands(a, bq, r.fprop, s_f, layer.backend, out_dtype=x2.dtype, bias=b)
    g, g_t = prepare_operand_pair(
        gy, OperandPlan(r.dgrad.a, r.dgrad, s_d, 1), OperandPlan(r.wgrad.a, r.wgrad, s_w, 1)
    )
    dx = gemm_operands(g, w_t, r.dgrad, s_d, layer.backend, out_dtype=x2.dtype)
    dw = gemm_operands(g_t, x_t, r.wgrad, s_w, layer.backend, out_dtype=w.dtype)
    return y, dx, dw, x_t.parts[0], w_t.parts[0]


def _bits(t):
    # Codes compared as bytes (torch.equal does not take every fp8 dtype); scales as they are.
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _check_ops(layer, device, dtype):
    gen = torch.Generator().manual_seed(3)
    x2 = torch.randn(T, K, generator=gen).to(device, dtype)
    gy = torch.randn(T, N, generator=gen).to(device, dtype)
    host_seeds = [11, 2**31 - 5, 123456789]  # offsets above 2^31 included
    seeds = seed_table(torch.tensor(host_seeds, device=device))
    key, w = recipe_key(layer.recipe), layer.weight.detach()
    b = None if layer.bias is None else layer.bias.detach()
    forward_op, backward_op = quant_linear_graph.graph_ops()
    y, *saved = forward_op(x2, w, b, seeds, key, layer.backend, True, True, dtype)
    dx, dw = backward_op(
        gy, *saved, seeds, key, layer.backend, True, True, T, K, dtype, w.dtype, False
    )
    ref_y, ref_dx, ref_dw, x_t, w_t = _building_blocks(layer, x2, gy, host_seeds)
    for name, got, ref in (
        ("y", y, ref_y),
        ("dx", dx, ref_dx),
        ("dw", dw, ref_dw),
        ("X^T codes", saved[0], x_t.data),
        ("X^T scales", saved[1], x_t.scale),
        ("W^T codes", saved[3], w_t.data),
        ("W^T scales", saved[4], w_t.scale),
    ):
        assert got.dtype == ref.dtype and torch.equal(_bits(got), _bits(ref)), name


@pytest.mark.parametrize("recipe", GRAPH_RECIPES)
def test_ops_with_device_seeds_are_the_building_blocks_with_host_seeds(recipe):
    _check_ops(QuantLinear(K, N, recipe=recipe), "cpu", torch.float32)


@INTERPRETED
def test_compiled_layer_is_one_graph_and_draws_new_seeds_each_call():
    torch._dynamo.reset()
    layer = QuantLinear(K, N, bias=False, recipe="mxfp4")
    same = QuantLinear(K, N, bias=False, recipe="mxfp4")
    same.load_state_dict(layer.state_dict())
    compiled = torch.compile(layer, fullgraph=True)  # a graph break would raise
    x = torch.randn(2, T // 2, K)
    gy = torch.randn(2, T // 2, N)
    grads = []
    for call in range(2):
        xa, xb = (x.clone().requires_grad_(True) for _ in range(2))
        layer.zero_grad(set_to_none=True)
        same.zero_grad(set_to_none=True)
        compiled(xa).backward(gy)
        graph_quant_linear(xb, same.weight, None, same).backward(gy)  # the same ops, not compiled
        assert torch.equal(xa.grad, xb.grad) and torch.equal(layer.weight.grad, same.weight.grad)
        grads.append(layer.weight.grad)
        assert int(layer.graph_calls) == call + 1
    # Backward GEMMs are stochastically rounded with fresh seeds: two calls on the same data differ,
    # and both stay near the unquantized gradient.
    assert not torch.equal(grads[0], grads[1])
    exact = gy.reshape(-1, N).t() @ x.reshape(-1, K)
    for g in grads:
        assert float((g - exact).norm() / exact.norm()) < 0.3


def test_seeds_differ_between_layers_and_ranks_and_calls():
    a, b = QuantLinear(K, N, seed=0, recipe="mxfp4"), QuantLinear(K, N, seed=1, recipe="mxfp4")
    tables = (next_graph_seeds(a), next_graph_seeds(b), next_graph_seeds(a))
    sa, sb, sa2 = (t[0, :, 0].tolist() for t in tables)
    assert len({*sa, *sb, *sa2}) == 9
    assert all(0 <= s < 2**31 for s in sa)


def test_seed_table_holds_every_derived_seed_and_offset():
    # The graph ops' seeds: each derive_seed / seed_offset of a DeviceSeed is a view of the table
    # with the value the host-int path computes (also for a derivation the table does not hold).
    seeds = [0, 11, 2**31 - 1]
    table = seed_table(torch.tensor(seeds))
    for row, s in enumerate(seeds):
        d = DeviceSeed(table, row)
        assert int(d.value()) == s and int(seed_offset(d)) == seed_offset(s)
        for k in range(1, 5):
            dk = derive_seed(d, k)
            assert dk.table is table and int(dk.value()) == derive_seed(s, k)
            assert int(seed_offset(dk)) == seed_offset(derive_seed(s, k))
        assert int(derive_seed(derive_seed(d, 1), 2)) == derive_seed(derive_seed(s, 1), 2)


@pytest.mark.parametrize("calls,stream", [(0, 0), (1, 0xFFFFFFFF), (12345, 987654321), (2**33 + 7, 5)])
def test_seed_kernel_is_the_torch_ops_bit_for_bit(calls, stream):
    # The one-launch seed table (what the graph ops run where Triton runs) against the torch ops
    # it replaces, including counters past 2^32 (the hash takes its input mod 2^32).
    from lowbit.kernels._graph_seeds_triton import graph_seed_table
    from lowbit.nn.quant_linear_graph import _seeds_of

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors through Triton's interpreter")
    counter = torch.tensor(calls, dtype=torch.int64, device=dev)
    ref = _seeds_of(counter.clone(), stream)
    got = graph_seed_table(counter, stream)
    assert got.dtype == torch.int64 and torch.equal(got, ref)
    assert int(counter) == calls + 1


@INTERPRETED
def test_whole_model_with_seeded_recipe_compiles_as_one_graph():
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(K, K), nn.ReLU(), nn.Linear(K, N))
    convert_model(model, "nvfp4")
    x = torch.randn(32, K, requires_grad=True)
    out = torch.compile(model, fullgraph=True)(x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and [
        int(m.graph_calls) for m in model if isinstance(m, QuantLinear)
    ] == [1, 1]


@pytest.mark.parametrize(
    "spec",
    [
        QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic"),
        QuantSpec("fp8_e4m3", 32, "e8m0", "stochastic"),
        QuantSpec("int8", "row", rounding="stochastic"),
    ],
)
@INTERPRETED
def test_kernels_read_device_seeds_as_the_same_bits(spec):
    # The quantize kernel (plain and rotated), the rotation kernel and the pair kernel, under the
    # interpreter: a seed passed as a device tensor or as a seed table's entry (SEED_PTR) hashes
    # as the same int.
    x = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    for seed in (7, 2**31 - 1):
        table = seed_table(torch.tensor([seed, seed - 1]))  # 31-bit seeds, as the layers draw
        _check_device_seed(x, spec, seed, torch.tensor(seed), torch.tensor(seed - 1))
        _check_device_seed(x, spec, seed, DeviceSeed(table, 0), DeviceSeed(table, 1))


def _check_device_seed(x, spec, seed, t, t_next):
    from lowbit.kernels.hadamard import hadamard_rotate, rotate_quantize
    from lowbit.kernels.pair_quantize import quantize_pair, why_not_pair
    from lowbit.kernels.quantize import quantize_2d

    for a, b in zip(quantize_2d(x, spec, seed=seed)[:2], quantize_2d(x, spec, seed=t)[:2]):
        assert torch.equal(a, b)
    qa, qb = rotate_quantize(x, spec, 32, seed, seed=seed), rotate_quantize(x, spec, 32, t, seed=t)
    assert torch.equal(qa.data, qb.data) and torch.equal(qa.scale, qb.scale)
    assert torch.equal(hadamard_rotate(x, 32, seed), hadamard_rotate(x, 32, t))
    if why_not_pair(x, spec, spec) is not None:  # the pair kernel takes fp8/int8 only
        return
    pa = quantize_pair(x, spec, spec, seed=seed, seed_t=seed - 1)
    pb = quantize_pair(x, spec, spec, seed=t, seed_t=t_next)
    for q1, q2 in zip(pa, pb):
        assert torch.equal(q1.data, q2.data) and torch.equal(q1.scale, q2.scale)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("recipe", GRAPH_RECIPES)
def test_gpu_ops_are_the_building_blocks(recipe):
    # lowbit.kernels behind both, the ops reading their seeds from the device (SEED_PTR).
    _check_ops(QuantLinear(K, N, recipe=recipe, device="cuda", dtype=torch.bfloat16), "cuda", torch.bfloat16)


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4", "mxfp8", "int8", "fp8_blockwise"])
def test_gpu_compiled_layer_is_the_uncompiled_ops(recipe):
    # Inductor launches the recorded kernels; the same seeds must give the same codes, and cuBLAS
    # may sum in another order for the compiled graph's layouts (compared to a few BF16 ulps).
    torch._dynamo.reset()
    layer = QuantLinear(K * 4, N * 4, bias=False, recipe=recipe, device="cuda", dtype=torch.bfloat16)
    same = QuantLinear(K * 4, N * 4, bias=False, recipe=recipe, device="cuda", dtype=torch.bfloat16)
    same.load_state_dict(layer.state_dict())
    x = torch.randn(4, 256, K * 4, device="cuda", dtype=torch.bfloat16)
    gy = torch.randn(4, 256, N * 4, device="cuda", dtype=torch.bfloat16)
    xa, xb = (x.clone().requires_grad_(True) for _ in range(2))
    ya = torch.compile(layer, fullgraph=True)(xa)
    ya.backward(gy)
    yb = graph_quant_linear(xb, same.weight, None, same)
    yb.backward(gy)
    for name, a, b in (("y", yb, ya), ("dx", xb.grad, xa.grad), ("dw", same.weight.grad, layer.weight.grad)):
        err = float((a.float() - b.float()).norm() / a.float().norm())
        assert err < 2e-3, f"{name}: relative error {err:.2e}"
    assert int(layer.graph_calls) == int(same.graph_calls) == 1


_CUDA_GRAPH_SCRIPT = """
import torch
from lowbit.nn import QuantLinear
from lowbit.nn.quant_linear_graph import graph_quant_linear
torch.manual_seed(0)
kw = dict(bias=False, recipe="{recipe}", device="cuda", dtype=torch.bfloat16)
layer, same = QuantLinear(256, 384, **kw), QuantLinear(256, 384, **kw)
same.load_state_dict(layer.state_dict())
compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
x = torch.randn(4, 256, 256, device="cuda", dtype=torch.bfloat16)
gy = torch.randn(4, 256, 384, device="cuda", dtype=torch.bfloat16)
grads = []
for call in range(4):  # warm-up, recording, then replays of the CUDA graphs
    layer.zero_grad(set_to_none=True)
    same.zero_grad(set_to_none=True)
    xa, xb = (x.clone().requires_grad_(True) for _ in range(2))
    compiled(xa).backward(gy)
    graph_quant_linear(xb, same.weight, None, same).backward(gy)
    for a, b in ((xb.grad, xa.grad), (same.weight.grad, layer.weight.grad)):
        err = float((a.float() - b.float()).norm() / a.float().norm())
        assert err < 2e-3, (call, err)
    grads.append(layer.weight.grad.clone())
    assert int(layer.graph_calls) == call + 1, int(layer.graph_calls)
if {stochastic}:  # stochastic rounding with fresh seeds: every call's gradients differ
    assert all(not torch.equal(grads[i], grads[i + 1]) for i in range(3))
print("ok")
"""


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("recipe", ["mxfp4", "nvfp4", "fp8_blockwise"])
def test_gpu_opaque_ops_replayed_as_cuda_graphs_draw_new_seeds(recipe):
    # torch.compile(mode="reduce-overhead") records the opaque ops' kernels into CUDA graphs and
    # replays them: the seed counter must still advance on the device at every replay, and each
    # call must be what the uncompiled ops compute with the same counter. (Its own process, so
    # that no earlier test's CUDA graphs or compiled code are in the way.) fp8_blockwise (no
    # stochastic rounding): its operands are group- and tile-scaled pairs, whose outputs must
    # match the ops' fake (shapes-only) outputs, strides included (run 155 met a mismatch).
    import os
    import subprocess
    import sys

    env = dict(os.environ, LOWBIT_GRAPH_OPS="opaque", TRITON_INTERPRET="0")
    script = _CUDA_GRAPH_SCRIPT.format(recipe=recipe, stochastic=recipe != "fp8_blockwise")
    proc = subprocess.run([sys.executable, "-c", script],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


def test_select_mode_checks_its_argument(monkeypatch):
    with pytest.raises(ValueError, match="'fast'.*valid choices: 0, recorded, opaque"):
        quant_linear_graph.select_mode("fast")
    monkeypatch.setattr(quant_linear_graph, "MODE", "recorded")
    quant_linear_graph.select_mode("opaque")
    assert quant_linear_graph.MODE == "opaque"
    quant_linear_graph.select_mode("0")  # switching the ops off is always possible
    assert quant_linear_graph.MODE == "0"


def _compiled_call_matches_the_ops(recipe, device, dtype):
    # One compiled fwd+bwd of a fresh layer against the uncompiled graph ops with the same seeds.
    torch._dynamo.reset()
    kw = dict(bias=False, recipe=recipe, device=device, dtype=dtype)
    layer, same = QuantLinear(K, N, **kw), QuantLinear(K, N, **kw)
    same.load_state_dict(layer.state_dict())
    x = torch.randn(2, T // 2, K, device=device, dtype=dtype)
    gy = torch.randn(2, T // 2, N, device=device, dtype=dtype)
    xa, xb = (x.clone().requires_grad_(True) for _ in range(2))
    torch.compile(layer, fullgraph=True)(xa).backward(gy)
    graph_quant_linear(xb, same.weight, None, same).backward(gy)
    for name, a, b in (("dx", xb.grad, xa.grad), ("dw", same.weight.grad, layer.weight.grad)):
        err = float((a.float() - b.float()).norm() / a.float().norm())
        assert err < 2e-3, f"{name}: relative error {err:.2e}"
    assert int(layer.graph_calls) == 1


def _both_forms_in_one_process(device, dtype):
    # A "recorded" run (a benchmark) and then an "opaque" one (train.compile_mode=reduce_overhead)
    # in one process: each form has ops of its own names, and layers built under either mode run
    # (each call checked against the uncompiled ops). -> the distinct (forward, backward) op pairs.
    for mode in ("recorded", "opaque", "recorded"):
        quant_linear_graph.select_mode(mode)
        _compiled_call_matches_the_ops("mxfp4", device, dtype)
    return {quant_linear_graph.graph_ops(m) for m in ("recorded", "opaque")}


@INTERPRETED
def test_both_forms_in_one_process():
    # Under the interpreter "recorded" registers the opaque pair too.
    assert len(_both_forms_in_one_process("cpu", torch.float32)) == 1


@pytest.mark.gpu
@CUDA
def test_gpu_both_forms_in_one_process():
    # On CUDA the two forms are two pairs of ops: triton_ops and opaque custom ops.
    assert len(_both_forms_in_one_process("cuda", torch.bfloat16)) == 2


@pytest.mark.parametrize(
    ("mode", "device", "env", "expected"),
    [
        ("reduce-overhead", "cuda", None, "opaque"),
        ("default", "cuda", None, "0"),
        ("reduce-overhead", "cpu", None, "0"),
        ("max-autotune", "cuda", None, "opaque"),  # CUDA graphs too
        ("max-autotune-no-cudagraphs", "cuda", None, "0"),
        ("reduce-overhead", "cuda", "0", "0"),  # the user's LOWBIT_GRAPH_OPS wins
        ("default", "cuda", "opaque", "opaque"),
    ],
)
def test_trainer_runs_graph_ops_under_cuda_graphs(monkeypatch, mode, device, env, expected):
    from lowbit.nn import quant_linear_graph
    from lowbit.trainer.config import TrainConfig
    from lowbit.trainer.run import _select_graph_ops

    # Whatever an earlier run in the process chose: the opposite of what this run should get.
    monkeypatch.setattr(quant_linear_graph, "MODE", "0" if expected == "opaque" else "opaque")
    if env is None:
        monkeypatch.delenv("LOWBIT_GRAPH_OPS", raising=False)
    else:
        monkeypatch.setenv("LOWBIT_GRAPH_OPS", env)
    _select_graph_ops(TrainConfig(compile=True, compile_mode=mode), torch.device(device))
    assert quant_linear_graph.MODE == expected
