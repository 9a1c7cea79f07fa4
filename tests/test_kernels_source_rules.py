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
