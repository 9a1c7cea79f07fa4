"""The kernels compile for the H100 (sm_90) on this CPU machine, with the installed Triton's own
compiler and ptxas (benchmarks/offline_sass.py: a driver stub for the target, launches turned into
compiles, lowbit's launchers called on CPU tensors).

The rest of the suite runs the kernels in Triton's interpreter, which executes jit functions as
Python: code it accepts can still fail to compile for a GPU (tests/test_kernels_source_rules.py
lists cases met on the H100). This compiles one specialization of each kernel family the
launchers pick for the GPU (pair quantizers, SwiGLU, the quantize kernel's modes, the Hadamard
quantizer, the GEMM), so such a failure shows up here rather than on the next GPU run.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "offline_sass.py"


def _cases() -> tuple[str, ...]:
    # The tool's CASES, read from its source: importing it would compile-mode this interpreter.
    for node in ast.parse(TOOL.read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if [t.id for t in targets if isinstance(t, ast.Name)] == ["CASES"]:
            return ast.literal_eval(node.value)
    raise AssertionError(f"no CASES in {TOOL}")


def test_every_kernel_family_compiles_for_sm90() -> None:
    triton = pytest.importorskip("triton")
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not all((tools / tool).exists() for tool in ("ptxas", "cuobjdump")):
        pytest.skip("this Triton wheel has no ptxas or cuobjdump")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # Every case (--case), split over two tool processes side by side: the time goes to Triton's
    # compiles and a cuobjdump per kernel, one core each, and the suite leaves the second core idle.
    cases = _cases()
    procs = [
        subprocess.Popen([sys.executable, str(TOOL), "--top", "0", *(f"--case={c}" for c in half)], env=env,
                         cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for half in (cases[0::2], cases[1::2])
    ]
    try:
        outs = [proc.communicate(timeout=900) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-4000:]
    compiled = {line.split()[0] for out, _ in outs for line in out.splitlines() if " instructions, " in line}
    assert compiled == set(cases), f"no kernel compiled for {sorted(set(cases) - compiled)}"
