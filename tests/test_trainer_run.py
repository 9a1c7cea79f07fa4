"""End-to-end runs of the real trainer on CPU: learning, exact resume, checkpoints, W&B files."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from lowbit.trainer.checkpoint import CheckpointError, complete_checkpoints


def test_short_run_loss_decreases(small_run):
    s = small_run(["train.steps=30", "run_name=learn"])
    losses = [v for _, v in s["train_losses"]]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert s["final_val_loss"] < 4.0  # ln(256)=5.55 is the untrained loss of byte tokens
    assert Path(s["run_dir"], "summary.json").is_file()


def test_kill_and_resume_is_bitwise(small_run, tmp_path):
    full = small_run(["train.steps=12", "run_name=full", "checkpoint.every=0"])
    # The same run stopped after 5 steps (as if killed after its checkpoint), then resumed twice.
    small_run(["train.steps=12", "run_name=split", "train.stop_after=5", "checkpoint.every=0"])
    small_run(["train.steps=12", "run_name=split", "train.stop_after=4", "resume=auto"])
    split = small_run(["train.steps=12", "run_name=split", "resume=auto"])
    assert split["step"] == 12
    assert [s for s, _ in split["train_losses"]] == list(range(1, 13))
    assert split["train_losses"] == full["train_losses"]  # bitwise: exact float equality
    assert split["final_val_loss"] == full["final_val_loss"]


def test_grad_accum_matches_larger_micro_batch(small_run):
    a = small_run(["train.steps=4", "run_name=a", "train.micro_batch_size=4", "train.grad_accum=2"])
    b = small_run(["train.steps=4", "run_name=b", "train.micro_batch_size=8", "train.grad_accum=1"])
    for (_, la), (_, lb) in zip(a["train_losses"], b["train_losses"]):
        assert la == pytest.approx(lb, rel=1e-4)


def test_keeps_last_k_and_ignores_partial_writes(small_run, tmp_path):
    small_run(["train.steps=8", "run_name=k", "checkpoint.every=2", "checkpoint.keep_last=2"])
    root = tmp_path / "k" / "checkpoints"
    assert [s for s, _ in complete_checkpoints(root)] == [6, 8]
    # A crash mid-write leaves a temp directory; resume must skip it and keep it for inspection.
    partial = root / ".tmp-step_00000010-123-456"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    s = small_run(["train.steps=10", "run_name=k", "checkpoint.keep_last=2"])
    assert s["step"] == 10
    assert partial.is_dir()
    assert [s for s, _ in complete_checkpoints(root)] == [8, 10]


def test_corrupted_checkpoint_is_a_clear_error_and_nothing_is_deleted(small_run, tmp_path):
    small_run(["train.steps=4", "run_name=c", "checkpoint.every=2"])
    root = tmp_path / "c" / "checkpoints"
    newest = complete_checkpoints(root)[-1][1]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    weights = newest / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*corrupted|corrupted.*model\.safetensors"):
        small_run(["train.steps=6", "run_name=c"])
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert before == after


def test_truncated_optimizer_file_is_detected(small_run, tmp_path):
    small_run(["train.steps=2", "run_name=t"])
    ckpt = complete_checkpoints(tmp_path / "t" / "checkpoints")[-1][1]
    opt = ckpt / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        small_run(["train.steps=4", "run_name=t"])


def test_resume_none_refuses_to_overwrite(small_run, tmp_path):
    small_run(["train.steps=2", "run_name=o"])
    with pytest.raises(CheckpointError, match="resume=auto"):
        small_run(["train.steps=2", "run_name=o", "resume=none"])
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        small_run(["train.steps=2", "run_name=o2", f"resume={tmp_path}/nowhere"])


def test_checkpoint_of_another_model_is_rejected(small_run, tmp_path):
    small_run(["train.steps=2", "run_name=m"])
    ckpt = complete_checkpoints(tmp_path / "m" / "checkpoints")[-1][1]
    shutil.copytree(ckpt, tmp_path / "copy")
    with pytest.raises(CheckpointError, match="model.n_layers: saved 2, now 3.*run_name="):
        small_run(["train.steps=4", "run_name=m3", "model.n_layers=3", f"resume={tmp_path / 'copy'}"])
    with pytest.raises(CheckpointError, match="model.dim: saved 64, now 96"):
        small_run(["train.steps=4", "run_name=m", "model.dim=96"])  # resume=auto in the same run


def test_nan_loss_stops_without_checkpoint(small_run, tmp_path):
    with pytest.raises(FloatingPointError, match="loss became"):
        small_run(["train.steps=4", "run_name=nan", "model.init_std=1e30"])
    assert complete_checkpoints(tmp_path / "nan" / "checkpoints") == []


def check_kill_and_resume_is_bitwise(small_run, extra: list[str], name: str) -> None:
    # The run stopped after 2 of 4 steps (as if killed after its checkpoint) and resumed, against
    # the uninterrupted run: the same losses bit for bit. On a GPU that needs deterministic kernels
    # (attention's backward adds with atomics); on the CPU the option changes nothing.
    # The compiled cases pass model.n_layers=1: their time goes to tracing every QuantLinear call
    # (twice per run: the training and the eval graph), and one block still holds seven
    # QuantLinear layers, each with its own counter, history or pair to bring back.
    extra = [*extra, "train.deterministic=true"]
    full = small_run([*extra, f"run_name={name}full", "checkpoint.every=0"])
    small_run([*extra, f"run_name={name}split", "train.stop_after=2"])
    split = small_run([*extra, f"run_name={name}split"])
    assert [s for s, _ in split["train_losses"]] == [1, 2, 3, 4]
    assert split["train_losses"] == full["train_losses"]
    assert split["final_val_loss"] == full["final_val_loss"]


def test_kill_and_resume_is_bitwise_for_quantized_training(small_run):
    # MXFP4 draws Hadamard signs and stochastic-rounding noise from each layer's own generator and
    # AdamW8bit keeps block-quantized states: both must come back exactly from the checkpoint.
    extra = [
        "train.steps=4",
        "train.eval_every=4",
        "quant=mxfp4",
        "optim=adamw8bit",
        "optim.min_quant_numel=1024",
    ]
    check_kill_and_resume_is_bitwise(small_run, extra, "q")


def test_engine_step_leaves_the_grad_norm_on_the_device():
    # Reading the norm in step() (float(norm)) would wait for the GPU every step, so the host could
    # not queue the next step meanwhile; the loop reads it at log time instead. The returned norm
    # is the norm of the gradients before clipping, as clip_grad_norm_ reports it.
    import torch

    from lowbit.trainer.config import DistBackend
    from lowbit.trainer.distributed import DistContext
    from lowbit.trainer.engines import TorchEngine

    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ctx = DistContext(0, 1, 0, torch.device("cpu"), DistBackend.none)
    engine = TorchEngine(model, opt, ctx, grad_accum=1, grad_clip=1.0, compile_model=False)
    model(torch.ones(2, 4)).square().sum().backward()
    expected = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    norm = engine.step()
    assert isinstance(norm, torch.Tensor) and norm.device.type == "cpu"
    torch.testing.assert_close(norm, expected)
    assert all(p.grad is None for p in model.parameters())


def test_kill_and_resume_is_bitwise_for_compiled_graph_op_training(small_run, monkeypatch):
    # Compiled mxfp4 with its layers as graph ops (what train.compile_mode=reduce_overhead runs on
    # CUDA; here the interpreter's kernels): the seeds come from each layer's call counter on the
    # device, which the checkpoint must bring back, or the resumed run would redraw used seeds.
    from lowbit.nn import quant_linear_graph

    monkeypatch.setenv("LOWBIT_GRAPH_OPS", "opaque")  # the user's choice, which the trainer keeps
    monkeypatch.setattr(quant_linear_graph, "MODE", "opaque")
    extra = ["train.steps=4", "train.eval_every=4", "quant=mxfp4", "train.compile=true", "model.n_layers=1"]
    check_kill_and_resume_is_bitwise(small_run, extra, "g")


def test_resume_under_another_recipe_warns_and_continues(small_run):
    # Changing the recipe on resume is allowed (e.g. finishing an fp8 run in bf16), but said.
    small_run(["train.steps=3", "run_name=rq", "train.stop_after=2", "quant=fp8_tensorwise"])
    with pytest.warns(UserWarning, match="trained with quant=fp8_tensorwise, under quant=bf16"):
        out = small_run(["train.steps=3", "run_name=rq"])
    assert [s for s, _ in out["train_losses"]] == [1, 2, 3]


def test_kill_and_resume_is_bitwise_for_compiled_delayed_scaling(small_run):
    # Compiled fp8_delayed (traced, the histories updated on the device): the checkpoint carries
    # every layer's amax history, or the resumed run would scale its first calls by their own amax.
    extra = ["train.steps=4", "train.eval_every=4", "quant=fp8_delayed", "train.compile=true",
             "model.n_layers=1"]
    check_kill_and_resume_is_bitwise(small_run, extra, "d")


def test_kill_and_resume_is_bitwise_with_the_weight_pairs_in_the_step(small_run, tmp_path):
    # The same with torch's fused AdamW, whose step writes the fp8 weight pairs (here in Triton's
    # interpreter): the checkpoint's histories already hold the last step's weight amaxes, so the
    # resumed run must write those pairs again rather than quantize (and record) in the forward.
    from lowbit.trainer.engines import WEIGHT_PAIRS_FILE

    extra = ["train.steps=4", "train.eval_every=4", "quant=fp8_delayed", "train.compile=true",
             "optim.fused=true", "model.n_layers=1"]
    check_kill_and_resume_is_bitwise(small_run, extra, "p")
    assert (tmp_path / "psplit" / "checkpoints" / "step_00000002" / WEIGHT_PAIRS_FILE).is_file()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_grad_accumulation_under_cuda_graphs_sums_the_micro_batches():
    # Three steps of three micro-batches through TorchEngine with CUDA graphs; the summed
    # gradients before each optimizer step must be the eager model's. lr = 0 keeps the weights
    # fixed, so every step compares the same function. (Without the engine's copies of the
    # first gradients, torch 2.11 raised here on the H100: docs/BENCHMARKS.md, run 84.)
    import copy

    from lowbit.trainer.config import DistBackend
    from lowbit.trainer.distributed import DistContext
    from lowbit.trainer.engines import TorchEngine

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    ctx = DistContext(0, 1, 0, torch.device("cuda"), DistBackend.none)
    engine = TorchEngine(model, opt, ctx, grad_accum=3, grad_clip=0.0, compile_model=True,
                         compile_mode="reduce-overhead", criterion=lambda out, y: (out - y).square().mean())
    assert engine.cuda_graphs
    for _ in range(3):
        xs = [torch.randn(16, 64, device="cuda") for _ in range(3)]
        y = torch.zeros(16, 8, device="cuda")
        for x in xs:
            engine.backward(engine.loss(x, y))
        grads = [p.grad.clone() for p in model.parameters()]
        ref.zero_grad(set_to_none=True)
        for x in xs:
            (ref(x).square().mean() / 3).backward()
        for g, r in zip(grads, ref.parameters()):
            torch.testing.assert_close(g, r.grad)
        engine.step()



def test_grad_accumulation_copies_every_first_gradient_of_a_step():
    # The engine's CUDA-graph rule, run on the CPU (the copies do not need a GPU to be checked):
    # a parameter whose first gradient of the step arrives in a later micro-batch (here the second
    # branch, unused by micro-batch 1) is copied then; the sums are the plain accumulation's.
    from lowbit.trainer.config import DistBackend
    from lowbit.trainer.distributed import DistContext
    from lowbit.trainer.engines import TorchEngine

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    opt = torch.optim.SGD([*a.parameters(), *b.parameters()], lr=0.0)
    ctx = DistContext(0, 1, 0, torch.device("cpu"), DistBackend.none)
    engine = TorchEngine(a, opt, ctx, grad_accum=2, grad_clip=0.0, compile_model=False)
    engine.cuda_graphs = True
    x1, x2 = torch.randn(2, 4), torch.randn(2, 4)
    engine.backward(a(x1).sum())
    first = a.weight.grad
    assert b.weight.grad is None and engine._owned_grads == {id(p) for p in a.parameters()}
    engine.backward(a(x2).sum() + b(x2).sum())
    assert engine._owned_grads == {id(p) for p in [*a.parameters(), *b.parameters()]}
    assert a.weight.grad is first  # accumulated into the copy in place
    ones = torch.ones(3, 2)  # d(sum of outputs)/d(output): the weight's gradient is ones @ x
    torch.testing.assert_close(a.weight.grad, (ones @ x1 + ones @ x2) / 2)
    torch.testing.assert_close(b.weight.grad, ones @ x2 / 2)
    engine.step()
    assert engine._owned_grads == set()


def test_deterministic_option_is_on_for_the_run_only(monkeypatch):
    # train.deterministic turns torch's deterministic algorithms on inside the run and gives the
    # caller's setting back afterwards, also when the run raises.
    from lowbit.trainer.run import deterministic_algorithms

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="boom"), deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        raise RuntimeError("boom")
    assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # set for the run only
    with deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()
