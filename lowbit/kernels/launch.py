"""How lowbit.kernels launch their Triton kernels: `launchable(kernel)[grid](...)`, seeds by `seed_args`.

Inside a `torch.library.triton_op` (QuantLinear's graph ops, lowbit.nn.quant_linear_graph)
a kernel must be launched through `torch.library.wrap_triton`, so that tracing records the launch
in the graph and Inductor launches it from its generated code, with none of our Python per call.
Outside such an op (and always under TRITON_INTERPRET=1) wrap_triton hands back the kernel itself,
so every launcher goes through `launchable`; on a GPU an eager launch then skips Triton's per-call
argument binding (lowbit.kernels.fast_launch).

Seeds. The eager layers draw one seed per GEMM call on the host and pass kernels the hash offset
seed * golden mod 2^32 as an int32 argument. A traced graph cannot draw on the host: its seeds are
int64 tensors on the device (lowbit.nn.quant_linear_graph), and their derived seeds and offsets
are views of one table (lowbit.quant.rounding.seed_table). `seed_args` turns a kernel's offsets
into either form; with tensors the kernel loads them (its SEED_PTR constexpr), and the bits it
hashes are the same as for the equal ints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from lowbit.kernels.fast_launch import UNKEYED, fast, runtime_key

_WRAP: Callable[[Any], Any] | None = getattr(torch.library, "wrap_triton", None)


def launchable(kernel: Any) -> Any:
    """`kernel`, wrapped by torch.library.wrap_triton where that records it (inside a triton_op);
    a launcher that does nothing while `shapes_only` (an opaque op's fake implementation); else
    `kernel` behind lowbit.kernels.fast_launch (on a GPU)."""
    if _shapes_only:
        return _NO_LAUNCH
    # wrap_triton costs ~20 us a call on a slow host (its imports and checks): asked only once a
    # recording op exists (`enable_recording`). Where it hands back the kernel itself (no
    # tracing), eager launches skip Triton's per-call binding (lowbit.kernels.fast_launch).
    if _recording and _WRAP is not None:
        wrapped = _WRAP(kernel)
        if wrapped is not kernel:
            return wrapped
    return fast(kernel)


_recording = False


def enable_recording() -> None:
    """Launch through wrap_triton from now on (a triton_op that records launches is registered)."""
    global _recording
    _recording = True


class _NoLaunch:
    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: None


_NO_LAUNCH = _NoLaunch()
_shapes_only = False


class shapes_only:
    """Context in which kernels are not launched: an opaque custom op's fake implementation runs
    its real body on fake tensors for the output shapes, and fake tensors have no memory."""

    def __enter__(self) -> None:
        global _shapes_only
        self._prev, _shapes_only = _shapes_only, True

    def __exit__(self, *exc: object) -> None:
        global _shapes_only
        _shapes_only = self._prev


def as_i32(seed_off: int) -> int:
    """A uint32 seed offset as the int32 with the same bits. Triton types a Python int argument
    by its value (i32 below 2^31, i64 above) and specializes on it, so a raw offset would compile
    new kernel variants as seeds change; as i32 (with do_not_specialize) one variant serves all.
    The kernel adds it to an int64 index and truncates to uint32: the same bits mod 2^32."""
    return seed_off - (1 << 32) if seed_off >= 1 << 31 else seed_off


def _offset_tensor(off: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    # One int64 element whose low 32 bits are the offset: the kernel adds it to an int64 index and
    # truncates to uint32, so only those bits count. An int64 offset (a seed table's entry,
    # lowbit.quant.rounding.DeviceSeed) is passed as a view, without any device work.
    if not isinstance(off, torch.Tensor):
        return torch.full((1,), int(off) & 0xFFFFFFFF, dtype=torch.int64, device=device)
    if off.dtype == torch.int64 and off.device == device:
        return off.reshape(1)
    return off.to(device=device, dtype=torch.int64).reshape(1)


def seed_args(*offsets: int | torch.Tensor | None) -> tuple[list[int | torch.Tensor], bool]:
    """The kernel arguments for hash offsets (None: unused, passed as 0) and the SEED_PTR flag:
    ints as int32 values when none is a tensor, else every one as a one-element int64 tensor."""
    tensors = [o for o in offsets if isinstance(o, torch.Tensor)]
    if not tensors:
        return [as_i32(int(o or 0)) for o in offsets], False
    dev = tensors[0].device
    return [_offset_tensor(0 if o is None else o, dev) for o in offsets], True


def _spec_key(v: Any, exact: bool) -> Any:
    # What Triton specializes an argument on (fast_launch.runtime_key; the TTIR, and so which
    # tensors it writes, depends on no more); constexprs (`exact`) by value.
    if exact and not isinstance(v, torch.Tensor):
        return v
    key = runtime_key(v)
    return ("?", id(v)) if key is UNKEYED else key


def _constexpr_names(kernel: Any) -> frozenset[str] | None:
    f = kernel
    while not hasattr(f, "params") and hasattr(f, "fn"):  # autotune / heuristics wrappers
        f = f.fn
    params = getattr(f, "params", None)
    return None if params is None else frozenset(p.name for p in params if p.is_constexpr)


_analysis_cached = False


def cache_kernel_analysis() -> None:
    """Memoize Inductor's per-launch analysis of which tensors a recorded kernel writes.

    While functionalizing a traced graph, torch generates a kernel's TTIR for every recorded
    launch (torch._higher_order_ops.triton_kernel_wrap.identify_accessed_tensors; 2.11 and 2.13),
    uncached. A compiled 1b model with graph-op layers records ~1300 launches of large kernels:
    on the H100 its compile had not reached the first step after 340 s. The answer depends only
    on the kernel and what Triton specializes on (`_spec_key`), so it is memoized on that; where
    the function is not found (another torch), compiles are slow but correct.
    """
    global _analysis_cached
    if _analysis_cached:
        return
    _analysis_cached = True
    try:
        from torch._higher_order_ops import triton_kernel_wrap as tkw
    except ImportError:
        return
    for name in ("identify_accessed_tensors", "identify_mutated_tensors"):
        fn = getattr(tkw, name, None)
        if fn is None:
            continue
        memo: dict[Any, Any] = {}

        def cached(kernel: Any, kwargs: dict, *rest: Any, _fn: Any = fn, _memo: dict = memo) -> Any:
            const = _constexpr_names(kernel)
            try:
                exact = {k: const is None or k in const for k in kwargs}
                args = tuple(sorted((k, _spec_key(v, exact[k])) for k, v in kwargs.items()))
                key = (id(kernel), args, repr(rest))
            except Exception:  # an argument we cannot key: no memo
                return _fn(kernel, kwargs, *rest)
            if key not in _memo:
                _memo[key] = _fn(kernel, kwargs, *rest)
            return _memo[key]

        setattr(tkw, name, cached)
