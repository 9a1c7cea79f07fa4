"""How lowbit.kernels launch their Triton kernels: `launchable(kernel)[grid](...)`, seeds by `seed_args`.

Inside a `torch.library.triton_op` (QuantLinear's traced kernel ops, lowbit.nn.quant_linear_ops)
a kernel must be launched through `torch.library.wrap_triton`, so that tracing records the launch
in the graph and Inductor launches it from its generated code, with none of our Python per call.
Outside such an op (and always under TRITON_INTERPRET=1) wrap_triton hands back the kernel itself,
so every launcher goes through `launchable` and the eager path is unchanged.

Seeds. The eager layers draw one seed per GEMM call on the host and pass kernels the hash offset
seed * golden mod 2^32 as an int32 argument. A traced graph cannot draw on the host: its seeds are
int64 tensors on the device (lowbit.nn.quant_linear_ops), and the offsets derived from them are
tensors too. `seed_args` turns a kernel's offsets into either form; with tensors the kernel loads
them (its SEED_PTR constexpr), and the bits it hashes are the same as for the equal ints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

_WRAP: Callable[[Any], Any] | None = getattr(torch.library, "wrap_triton", None)


def launchable(kernel: Any) -> Any:
    """`kernel`, wrapped by torch.library.wrap_triton where that records it (inside a triton_op)."""
    return _WRAP(kernel) if _WRAP is not None else kernel


def as_i32(seed_off: int) -> int:
    """A uint32 seed offset as the int32 with the same bits. Triton types a Python int argument
    by its value (i32 below 2^31, i64 above) and specializes on it, so a raw offset would compile
    new kernel variants as seeds change; as i32 (with do_not_specialize) one variant serves all.
    The kernel adds it to an int64 index and truncates to uint32: the same bits mod 2^32."""
    return seed_off - (1 << 32) if seed_off >= 1 << 31 else seed_off


def _i32_tensor(off: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    # One int32 element holding the offset's low 32 bits (what the kernel loads).
    if not isinstance(off, torch.Tensor):
        return torch.full((1,), as_i32(int(off)), dtype=torch.int32, device=device)
    t = off.to(device=device, dtype=torch.int64).reshape(1) & 0xFFFFFFFF
    return torch.where(t >= 1 << 31, t - (1 << 32), t).to(torch.int32)


def seed_args(*offsets: int | torch.Tensor | None) -> tuple[list[int | torch.Tensor], bool]:
    """The kernel arguments for hash offsets (None: unused, passed as 0) and the SEED_PTR flag:
    ints as int32 values when none is a tensor, else every one as a one-element int32 tensor."""
    tensors = [o for o in offsets if isinstance(o, torch.Tensor)]
    if not tensors:
        return [as_i32(int(o or 0)) for o in offsets], False
    dev = tensors[0].device
    return [_i32_tensor(0 if o is None else o, dev) for o in offsets], True


def aligned(x: torch.Tensor, nbytes: int) -> bool:
    """Whether x's first element sits at a multiple of `nbytes`. While a graph is traced the
    tensors have no address; torch's allocations (and Inductor's) are 16-byte aligned, so the
    storage offset then decides."""
    try:
        return x.data_ptr() % nbytes == 0
    except RuntimeError:  # a FakeTensor / FunctionalTensor
        return (x.storage_offset() * x.element_size()) % nbytes == 0
