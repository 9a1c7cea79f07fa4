"""Rules on the Triton kernel sources that the CPU interpreter cannot check.

The interpreter runs jit functions as Python, so some code that it accepts fails to compile on a GPU.
Each rule here is one such case met on the H100 (Triton 3.6).
"""
from __future__ import annotations

import ast
from pathlib import Path

KERNELS = Path(__file__).resolve().parents[1] / "lowbit" / "kernels"


def _is_jit(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return isinstance(target, ast.Attribute) and target.attr == "jit"


def _string_defaults(tree: ast.Module) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list):
            args = node.args.posonlyargs + node.args.args
            for arg, default in zip(args[len(args) - len(node.args.defaults):], node.args.defaults):
                if isinstance(default, ast.Constant) and isinstance(default.value, str):
                    found.append(f"{node.name}({arg.arg}={default.value!r}) line {node.lineno}")
    return found


def test_rule_finds_a_string_default() -> None:
    # The rule itself must see the case it exists for.
    src = "@triton.jit\ndef f(x, EV: tl.constexpr = ''):\n    pass\n"
    assert _string_defaults(ast.parse(src)) == ["f(EV='') line 2"]


def test_no_jit_function_has_a_string_default() -> None:
    # A string default of a jit helper reaches Triton 3.6's compiler as a bare str, not a constexpr:
    # "'str' object has no attribute 'type'" when another jit function calls it without that argument
    # (every quantize kernel failed so on the H100); the interpreter runs it fine. Callers pass it.
    files = sorted(KERNELS.glob("*.py"))
    assert files, KERNELS
    found = [f"{f.name}: {s}" for f in files for s in _string_defaults(ast.parse(f.read_text()))]
    assert found == []


# Unary minus of a value in a jit function, each checked: where the sign of a zero cannot matter.
# Triton 3.6 (the GPU machine's) computes a float's -x as 0 - x, which gives +0 for x = +0 where
# IEEE negation gives -0; Triton 3.9, whose interpreter runs the CPU tests, negates, so they cannot
# see a -0 lost that way: _div_scale's x = -0 came out as +0's code on the H100 only
# (docs/BENCHMARKS.md, run 199). Negate a float whose zero's sign matters by multiplying by -1.0;
# add a new minus here once checked.
NEGATIONS_CHECKED = {
    ("_quant_math_triton.py", "_round_int", "-FMAX"),  # a nonzero constexpr bound
    ("_quant_math_triton.py", "_scales", "-e"),  # an integer exponent
    ("_quant_math_triton.py", "_int_codes", "-FMAX"),  # a nonzero constexpr bound
    ("_swiglu_pair_triton.py", "_sigmoid", "-g"),  # exp(-g): exp(+0) = exp(-0) = 1
    ("_scale_fold_triton.py", "_fp8_any", "-up"),  # an integer exponent
}


def _negations(tree: ast.Module, file: str) -> set[tuple[str, str, str]]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and any(_is_jit(d) for d in node.decorator_list):
            for n in ast.walk(node):
                minus = isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub)
                if minus and not isinstance(n.operand, ast.Constant):
                    found.add((file, node.name, ast.unparse(n)))
    return found


def test_rule_finds_a_negation() -> None:
    src = "@triton.jit\ndef f(x, d):\n    return tl.fma(-x, d, -1.0)\n"
    assert _negations(ast.parse(src), "k.py") == {("k.py", "f", "-x")}


def test_every_negation_in_a_kernel_is_checked() -> None:
    files = sorted(KERNELS.glob("*.py"))
    found = set().union(*(_negations(ast.parse(f.read_text()), f.name) for f in files))
    assert found - NEGATIONS_CHECKED == set()
    assert NEGATIONS_CHECKED - found == set(), "a checked negation is gone: drop it from the list"
