"""SASS of lowbit's Triton kernels compiled for a Hopper GPU on a machine without one (no GPU time).

Triton compiles for a named target without a device. This installs a driver stub that reports
sm_90 (or --arch), turns every launch into a warmup (compile, no run), calls lowbit's own
launchers on CPU tensors of the 1b model's shapes, and disassembles each compiled kernel with the
cuobjdump in Triton's wheel. The kernels get the GPU's specialization (the launchers choose their
hardware paths when TRITON_INTERPRET is not 1; CPU tensors are 16-byte aligned, as CUDA's are).

It prints each kernel's registers and spilled bytes per thread, its instruction counts by opcode,
and how many come before the subroutines (div.rn's slow path). The counts are static, over the
code (a fallback branch included), not of what runs: a hint for the ALU-bound quantizers when
comparing two forms of the same kernel, never a timing. --dump writes the SASS. To see what the
GPU machine's compiler makes, put that Triton version first on the path (Triton 3.6 there:
`pip install --target DIR triton==3.6.0`, then PYTHONPATH=DIR; docs/BENCHMARKS.md, twenty-third
pass).

    python benchmarks/offline_sass.py --case fp8_pair --case fp8_pair_delayed [--dump DIR]
    python benchmarks/offline_sass.py --case fp8_pair_delayed --knob _pair_quantize_triton.PAIR_WARPS=8
"""

from __future__ import annotations

import argparse
import ast
import collections
import importlib
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("offline_sass.py compiles kernels: unset TRITON_INTERPRET (it is 1)")
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOKENS, DIM = 16384, 2048
_OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)")


class _TargetOnly:
    """The part of a Triton driver that compiling needs: a target, device 0, a null stream."""

    def __init__(self, arch: int) -> None:
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


def _compile_only(compiled: list[tuple[str, object]], failed: list[BaseException]) -> None:
    # Every JITFunction launch compiles and returns without running; the kernels are kept in order,
    # and a compile that fails (front end, MLIR passes or ptxas) in `failed`, for main to raise.
    run = JITFunction.run

    def warmup_run(self: JITFunction, *args: object, grid: object, warmup: bool, **kwargs: object) -> object:
        try:
            kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        except BaseException as e:
            failed.append(e)
            raise
        compiled.append((self.fn.__name__, kernel))
        return kernel

    JITFunction.run = warmup_run


CASES = ("fp8_pair", "fp8_pair_delayed", "fp8_pair_delayed_fp32", "swiglu_fwd", "swiglu_bwd", "mxfp8",
         "nvfp4", "nvfp4_weight", "int8_rows", "mxfp4", "mxfp4_sr", "int4_rows", "int8_rows_14336",
         "int4_rows_14336", "fp8_rows_14336", "fp8_1x128", "fp8_128x128",
         "mxfp8_pair", "fp8_1x128_pair", "fp8_128x128_pair", "int4_hadamard", "gemm_int8_rows", "gemm_mxfp8",
         "gemm_nvfp4", "fp8_pair_own", "norm_pair", "adamw_pair", "row_major_bf16",
         "fp8_row_pair", "int4_hq_backward", "mxfp4_fold", "mxfp4_columns", "nvfp4_columns",
         "mxfp4_column_fold")


def _cases() -> dict[str, Callable[[], None]]:
    from lowbit.kernels import gemm as kg
    from lowbit.kernels import pair_quantize as pq
    from lowbit.kernels import pair_quantize_op as po
    from lowbit.kernels import quantize as kq
    from lowbit.kernels.column_quantize import column_quantize
    from lowbit.kernels.hadamard import rotate_quantize
    from lowbit.kernels.swiglu_pair import swiglu_grad_pairs_delayed, swiglu_pair_delayed
    from lowbit.kernels.transpose import row_major
    from lowbit.nn import norm_pair_fold as npf
    from lowbit.quant.quantize import QuantSpec
    from lowbit.quant.quantize import quantize as reference_quantize

    # CPU tensors take the kernels' (GPU) path, not the reference.
    kq.triton_runs_on = pq._runnable = lambda t: True
    quantize = kq.quantize

    def gemm(spec: QuantSpec) -> Callable[[], None]:
        # The Triton GEMM on reference-quantized operands of a 4096 x 2048 x 4096 product, with the
        # fixed configuration its autotuner starts from (autotuning needs the GPU).
        a, b = (reference_quantize(torch.randn(n, DIM), spec) for n in (4096, 4096))
        return lambda: kg.scaled_gemm(a, b, config=kg.fixed_config(kg._plan(a, b, False)))

    x = torch.randn(TOKENS, DIM, dtype=torch.bfloat16)
    w = torch.randn(DIM, DIM)
    hist = torch.ones(2, 16)  # a history with entries: the delayed pair's common case
    # SwiGLU's inputs: fewer rows than 1b's 16384 compile the same kernel (its specialization
    # depends on sizes only through divisibility by 16).
    g, u, dh = (torch.randn(1024, 8192, dtype=torch.bfloat16) for _ in range(3))
    hists = torch.ones(4, 16)
    row = QuantSpec("fp8_e4m3", "row")
    wide = torch.randn(64, 14336, dtype=torch.bfloat16)  # rows wider than 8192 (w2's input in Llama-3-8B)
    return {
        "fp8_pair": lambda: po.fp8_tensor_pair(x, x.abs().amax().float(), "fp8_e4m3"),
        "fp8_pair_delayed": lambda: po.fp8_tensor_pair_delayed_direct(x, "fp8_e4m3", hist[0], hist[1]),
        "fp8_pair_delayed_fp32": lambda: po.fp8_tensor_pair_delayed_direct(
            x.float(), "fp8_e4m3", hist[0], hist[1], round_bf16=True),
        "swiglu_fwd": lambda: swiglu_pair_delayed(g, u, "fp8_e4m3", hists[0], hists[1]),
        "swiglu_bwd": lambda: swiglu_grad_pairs_delayed(dh, g, u, "fp8_e4m3", (hists[0], hists[1]),
                                                        (hists[2], hists[3])),
        "mxfp8": lambda: quantize(x, QuantSpec("fp8_e4m3", 32, "e8m0")),
        "nvfp4": lambda: quantize(x, QuantSpec("fp4_e2m1", 16, "e4m3")),
        "nvfp4_weight": lambda: quantize(w, QuantSpec("fp4_e2m1", (16, 16), "e4m3")),
        "int8_rows": lambda: quantize(x, QuantSpec("int8", "row")),
        "mxfp4": lambda: quantize(x, QuantSpec("fp4_e2m1", 32, "e8m0")),
        "mxfp4_sr": lambda: quantize(x, QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic"), seed=1),
        "int4_rows": lambda: quantize(x, QuantSpec("int4", "row")),
        "int8_rows_14336": lambda: quantize(wide, QuantSpec("int8", "row")),
        "int4_rows_14336": lambda: quantize(wide, QuantSpec("int4", "row")),
        "fp8_rows_14336": lambda: quantize(wide, QuantSpec("fp8_e4m3", "row")),
        "fp8_1x128": lambda: quantize(x, QuantSpec("fp8_e4m3", 128)),
        "fp8_128x128": lambda: quantize(w, QuantSpec("fp8_e4m3", (128, 128))),
        "mxfp8_pair": lambda: pq.quantize_pair(x, QuantSpec("fp8_e4m3", 32, "e8m0"),
                                               QuantSpec("fp8_e4m3", 32, "e8m0")),
        "fp8_1x128_pair": lambda: pq.quantize_pair(x, QuantSpec("fp8_e4m3", 128), QuantSpec("fp8_e4m3", 128)),
        "fp8_128x128_pair": lambda: pq.quantize_pair(w, QuantSpec("fp8_e4m3", (128, 128)),
                                                     QuantSpec("fp8_e4m3", (128, 128))),
        "int4_hadamard": lambda: rotate_quantize(x, QuantSpec("int4", "row"), 32, signs_seed=3),
        "gemm_int8_rows": gemm(QuantSpec("int8", "row")),
        "gemm_mxfp8": gemm(QuantSpec("fp8_e4m3", 32, "e8m0")),
        "gemm_nvfp4": gemm(QuantSpec("fp4_e2m1", 16, "e4m3")),
        # x's own amax (the division checks only its divisor).
        "fp8_pair_own": lambda: po.fp8_tensor_pair_direct(x, "fp8_e4m3"),
        # The residual add + RMSNorm fused with the shared-input pair (gate, rows, transpose).
        "norm_pair": lambda: npf.fused(x.float(), x, torch.ones(DIM), 1e-5, torch.ones(6, 16), "fp8_e4m3"),
        # The AdamW step that writes the weight's fp8 pair, and its fix-up and roll launches.
        "adamw_pair": lambda: _adamw_pair(w),
        # The tiled copy of a transposed view (X^T) that row-scaled operands are quantized from.
        "row_major_bf16": lambda: row_major(x.t()),
        # fp8_rowwise's X and X^T: the row and column amax pass, then both sides' codes.
        "fp8_row_pair": lambda: pq.quantize_pair(x, row, row),
        # int4_hq's backward: a bit split's residual, the leverage column norms and gain-scaled
        # fp8 codes, and the epilogue of the split GEMM's two parts.
        "int4_hq_backward": lambda: _int4_hq_backward(x),
        # MXFP4 operands folded to fp8 for cuBLAS: each row's largest scale, then the codes.
        "mxfp4_fold": lambda: _mxfp4_fold(x),
        # wgrad's X^T rotated along the tokens and quantized in one read (the column quantizer):
        # MXFP4 with SR (its dY^T), NVFP4 with SR (an amax pass, then the codes).
        "mxfp4_columns": lambda: rotate_quantize(
            x.t(), QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic"), 32, signs_seed=3, seed=1),
        "nvfp4_columns": lambda: rotate_quantize(
            x.t(), QuantSpec("fp4_e2m1", 16, "e4m3", "stochastic"), 16, signs_seed=3, seed=1),
        "mxfp4_column_fold": lambda: column_quantize(
            x.t(), QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic"), 32, 3, 1, fold="tile"),
    }


def _mxfp4_fold(x: torch.Tensor) -> None:
    from lowbit.kernels import scale_fold
    from lowbit.quant.quantize import QuantSpec
    from lowbit.quant.quantize import quantize as reference_quantize

    scale_fold.triton_runs_on = lambda t: True
    q = reference_quantize(x.float(), QuantSpec("fp4_e2m1", 32, "e8m0"))
    scale_fold.fold_group_scales(q, torch.float8_e5m2)


def _int4_hq_backward(x: torch.Tensor) -> None:
    from lowbit.kernels import bit_split, leverage, parts_gemm
    from lowbit.quant.quantize import QuantSpec
    from lowbit.quant.quantize import quantize as reference_quantize

    bit_split.triton_runs_on = lambda t: True
    q = reference_quantize(x.float(), QuantSpec("int4", "row"))
    bit_split.residual(x, q)
    leverage.column_norms(q)
    leverage.int4_as_fp8(q, torch.ones(x.shape[1]))
    raw = torch.zeros(x.shape[0], x.shape[0], dtype=torch.int32)
    parts_gemm.combine([raw, raw], [q, q], q, torch.bfloat16)


def _adamw_pair(w: torch.Tensor) -> None:
    from lowbit.kernels import adamw_pair as ap

    hist = torch.ones(2, 16)
    pair = ap.WeightPair.empty(w, "fp8_e4m3")
    hp = ap.AdamWScalars(lr=1e-4, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=3)
    ap.launch_step(w, w.clone(), w.clone(), w.abs(), torch.ones(1), pair, hist[0], "fp8_e4m3", hp)
    ap.launch_finish(ap.pair_table([(w, pair, hist[0], hist[1])]), 16, "fp8_e4m3")


def opcode_counts(
    cubin: bytes, cuobjdump: str, dump: Path | None, name: str
) -> tuple[collections.Counter, int, tuple[int, int]]:
    """Instructions by opcode (predicates and modifiers stripped) of one cubin's SASS; how many
    come up to its last EXIT (the kernel's body without the subroutines after it: div.rn's slow
    path, which runs only for divisions it cannot do fast); and (registers, local memory bytes)
    per thread, local memory being spills."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
        usage = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    if dump is not None:
        (dump / f"{name}.sass").write_text(sass)
    ops = _OPCODE.findall(sass)
    body = max((i + 1 for i, op in enumerate(ops) if op == "EXIT"), default=len(ops))
    regs = re.search(r"REG:(\d+).*LOCAL:(\d+)", usage)
    return collections.Counter(ops), body, (int(regs[1]), int(regs[2])) if regs else (-1, -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", action="append", choices=CASES, help="default: all")
    ap.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90: H100)")
    ap.add_argument("--dump", type=Path, help="write each kernel's SASS into this folder")
    ap.add_argument("--top", type=int, default=12, help="opcodes listed per kernel")
    ap.add_argument("--knob", action="append", default=[],
                    help="MODULE.NAME=VALUE: a launch knob of lowbit.kernels.MODULE set first, e.g. "
                         "_pair_quantize_triton.PAIR_WARPS=8")
    args = ap.parse_args()
    for knob in args.knob:
        target, _, value = knob.partition("=")
        module, _, name = target.rpartition(".")
        try:
            mod = importlib.import_module(f"lowbit.kernels.{module}") if module else None
        except ModuleNotFoundError as e:
            if e.name != f"lowbit.kernels.{module}":
                raise
            mod = None
        if mod is None or not hasattr(mod, name):
            sys.exit(f"--knob {knob!r}: expected MODULE.NAME=VALUE naming a knob of lowbit.kernels.MODULE")
        try:
            setattr(mod, name, ast.literal_eval(value))
        except (ValueError, SyntaxError):
            sys.exit(f"--knob {knob!r}: {value!r} is not a Python literal (True, 8, (32, 128), ...)")
    cuobjdump = str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    if not os.access(cuobjdump, os.X_OK):
        sys.exit(f"no cuobjdump in this Triton wheel ({cuobjdump})")
    if args.dump is not None:
        args.dump.mkdir(parents=True, exist_ok=True)
    driver.set_active(_TargetOnly(args.arch))
    cases = _cases()
    assert tuple(cases) == CASES, "CASES lists _cases()'s names, in order"
    print(f"triton {triton.__version__}, sm_{args.arch}")
    for case in args.case or CASES:
        compiled: list[tuple[str, object]] = []
        failed: list[BaseException] = []
        run = JITFunction.run
        _compile_only(compiled, failed)
        try:
            cases[case]()
        except Exception as e:  # the launchers go on to read their (unwritten) outputs
            if failed or not compiled:
                raise
            print(f"  ({case}: stopped after compiling, at {type(e).__name__}: {str(e)[:120]})")
        finally:
            JITFunction.run = run
        if not compiled:
            print(f"{case:>22} compiled no kernel (its launcher took another path)")
        for i, (name, kernel) in enumerate(compiled):
            counts, body, (regs, local) = opcode_counts(kernel.asm["cubin"], cuobjdump, args.dump,
                                                        f"{case}.{i}.{name}")
            top = ", ".join(f"{op} {n}" for op, n in counts.most_common(args.top))
            print(f"{case:>22} {name:<28} warps {kernel.metadata.num_warps}, {regs} registers, "
                  f"{local} B spilled: {sum(counts.values())} instructions, {body} up to the last EXIT "
                  f"({top})")


if __name__ == "__main__":
    main()
