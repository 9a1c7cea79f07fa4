"""lowbit.kernels.fast_launch: the specialization key (CPU) and launches against Triton's own (GPU)."""

import pytest
import torch
from conftest import import_with_env

from lowbit.kernels.fast_launch import runtime_key


def test_runtime_key_separates_what_triton_specializes_on():
    # ints: 1, multiples of 16 and the integer type by range each get their own key
    keys = {runtime_key(v) for v in (1, 16, 32, 17, 2**31 - 1, 2**31, -(2**31), -(2**31) - 1, 2**63, 0)}
    assert runtime_key(16) == runtime_key(32) == runtime_key(0)  # one compiled kernel serves these
    assert runtime_key(17) == runtime_key(2**31 - 1) == runtime_key(-(2**31) + 1)
    assert len(keys) == 6  # i32: 1 | multiple of 16 | other; i64: multiple of 16 | other; u64
    assert runtime_key(2**31) != runtime_key(2**31 - 16)  # i64 against i32, both multiples of 16
    assert runtime_key(True) != runtime_key(1) and runtime_key(True) != runtime_key(False)
    assert runtime_key(0.5) == runtime_key(3.0)  # fp32 arguments are not specialized
    x = torch.zeros(8)
    assert runtime_key(x) == runtime_key(torch.ones(3))
    assert runtime_key(x[1:]) != runtime_key(x)  # 4 bytes off: not 16-byte aligned
    assert runtime_key(x.to(torch.bfloat16)) != runtime_key(x)
    assert runtime_key([1, 2]) is runtime_key((3,))  # not keyed: such calls are never cached


def test_a_bad_setting_is_refused_naming_the_choices():
    out = import_with_env("lowbit.kernels.fast_launch", "LOWBIT_FAST_LAUNCH", "yes")
    assert out.returncode != 0
    assert "LOWBIT_FAST_LAUNCH='yes'; valid choices: 0, 1" in out.stderr


def _bind_kernel(a, b, n, off, C: "tl.constexpr", D: "tl.constexpr" = 3, E: "tl.constexpr" = "x"):  # noqa: ANN001, ANN202, F821
    pass


def test_bind_orders_arguments_as_python_binds_them():
    # What FastLauncher passes to a compiled kernel: every parameter in the kernel's order with
    # defaults filled in, as inspect's binding of the same call gives; launch options kept apart.
    import inspect

    pytest.importorskip("triton")
    from triton.runtime.jit import JITFunction

    from lowbit.kernels.fast_launch import FastLauncher

    fl = FastLauncher(JITFunction(_bind_kernel))
    assert [fl.kernel.params[i].name for i in fl.runtime] == ["a", "b", "n", "off"]
    sig = inspect.signature(_bind_kernel)
    calls = [((1, 2, 3, 4, 5), {}), ((1, 2), dict(n=3, off=4, C=5, E="y", num_warps=4)),
             ((1,), dict(C=7, off=9, b=8, n=6, D=0, num_stages=2, num_warps=8))]
    for args, kwargs in calls:
        params = {k: v for k, v in kwargs.items() if k in sig.parameters}
        want = sig.bind(*args, **params)
        want.apply_defaults()
        vals, opts = fl.bind(args, kwargs)
        assert vals == list(want.arguments.values())
        assert dict(opts) == {k: v for k, v in kwargs.items() if k not in sig.parameters}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (compiled Triton kernels)")
def test_gpu_fast_launches_match_triton_and_key_every_specialization():
    import triton
    import triton.language as tl

    from lowbit.kernels.fast_launch import FastLauncher

    @triton.jit
    def axpb(x_ptr, y_ptr, n, off, a, B: tl.constexpr, NEG: tl.constexpr = False):
        i = tl.program_id(0) * B + tl.arange(0, B)
        m = i < n
        v = tl.load(x_ptr + i, m) * a + off  # off == 1 arrives as a constexpr int
        tl.store(y_ptr + i, -v if NEG else v, m)

    fl = FastLauncher(axpb)
    base = torch.arange(70, device="cuda", dtype=torch.float32)
    cases = []
    for x in (base, base[1:], base.to(torch.bfloat16)):  # aligned, misaligned, another dtype
        for n in (1, 16, 33):
            for off in (1, 16, 5, 2**40 + 3):
                cases.append((x, n, off))
    for rep in range(2):  # the second pass launches every case from the cache
        for x, n, off in cases:
            for neg in (False, True):
                y = torch.full((70,), -7.0, device="cuda", dtype=x.dtype)
                fl[(triton.cdiv(n, 16),)](x, y, n, off, 0.5, B=16, NEG=neg, num_warps=1)
                want = torch.full_like(y, -7.0)
                v = x[:n].float() * 0.5 + float(off)
                want[:n] = (-v if neg else v).to(x.dtype)
                torch.testing.assert_close(y, want, rtol=0, atol=0)
        # NEG left to its default: the same key as NEG=False given
        y = torch.zeros(70, device="cuda")
        fl[(3,)](base, y, 33, 5, 0.5, B=16, num_warps=1)
        torch.testing.assert_close(y[:33], base[:33] * 0.5 + 5.0, rtol=0, atol=0)
        if rep == 0:
            n_keys = len(fl.cache)
    assert len(fl.cache) == n_keys  # nothing new compiled or keyed the second time
    # x: aligned fp32 / misaligned fp32 / bf16; n: 1 / multiple of 16 / other; off: 1 / multiple
    # of 16 / other i32 / i64; NEG: 2
    assert n_keys == 3 * 3 * 4 * 2
