"""Eager Triton launches without JITFunction.run's per-call work, for lowbit.kernels' launchers.

`kernel[grid](*args)` through Triton (3.6 on the H100) costs ~25 us of host time a launch: it binds
and specializes every argument and hashes the result before it finds the compiled kernel. An
eager QuantLinear makes 6-15 launches a fwd+bwd, and its small layers are host-bound.
`FastLauncher` keeps each compiled kernel under a key of exactly what Triton specializes on (or
more), and launches a hit through the CompiledKernel's own launcher (~6 us there). A miss, and
anything it does not key, goes through Triton as before and caches what Triton compiled. The key:

- constexpr arguments and launch options (num_warps, ...): by value;
- tensors: dtype and whether the address is a multiple of 16 (Triton's alignment attribute);
- ints: whether 1, whether a multiple of 16, and the integer type Triton picks by range;
- bools by value, floats by type only (Triton passes them as fp32, never specialized), None.

Any other argument type is not cached. Only plain JITFunctions on a GPU take this path (the
interpreter, autotuners and Triton's pre-run hooks keep Triton's own); `LOWBIT_FAST_LAUNCH=0`
turns it off.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from lowbit.env_flags import env_flag

ENABLED = env_flag("LOWBIT_FAST_LAUNCH", True)

MAX_KEYS = 4096  # compiled kernels kept per kernel; beyond it, new specializations go through Triton
UNKEYED = object()  # runtime_key of an argument of a type not keyed: that call is not cached
_EMPTY = inspect.Parameter.empty  # a parameter without an argument or default: Triton raises
_I32, _I64 = 1 << 31, 1 << 63


def runtime_key(v: Any) -> Any:
    """What a non-constexpr argument's compiled kernel depends on (see the module docstring)."""
    t = type(v)
    if t is bool or v is None:
        return v
    if t is int:
        rng = 0 if -_I32 <= v < _I32 else 1 if -_I64 <= v < _I64 else 2
        return (v == 1, v % 16 == 0, rng)
    if t is float:
        return float
    if isinstance(v, torch.Tensor):
        return (v.dtype, aligned(v, 16))
    return UNKEYED


def aligned(x: torch.Tensor, nbytes: int) -> bool:
    """Whether x's first element sits at a multiple of `nbytes`. While a graph is traced the
    tensors have no address; torch's allocations (and Inductor's) are 16-byte aligned, so the
    storage offset then decides."""
    try:
        return x.data_ptr() % nbytes == 0
    except RuntimeError:  # a FakeTensor / FunctionalTensor
        return (x.storage_offset() * x.element_size()) % nbytes == 0


class FastLauncher:
    """`launcher[grid](*args, **kwargs)` with the semantics of `kernel[grid](...)` (a JITFunction)."""

    def __init__(self, kernel: Any) -> None:
        self.kernel = kernel
        params = kernel.params
        self.index = {p.name: i for i, p in enumerate(params)}
        self.defaults = [p.default for p in params]
        self.runtime = [i for i, p in enumerate(params) if not p.is_constexpr]
        self.cache: dict[tuple, Any] = {}
        self._device: Callable[[], int] | None = None  # Triton's driver, asked at the first launch
        self._stream: Callable[[int], int] | None = None
        try:
            from triton import knobs

            self._hooks = knobs.runtime
        except ImportError:  # older Triton: no launch hooks to honour
            self._hooks = None

    def __getitem__(self, grid: Any) -> Callable[..., Any]:
        def launch(*args: Any, **kwargs: Any) -> Any:
            return self._launch(grid, args, kwargs)

        return launch

    def bind(self, args: tuple, kwargs: dict) -> tuple[list, tuple]:
        """(every parameter's value in the kernel's order, defaults filled in, as Triton passes
        them to the compiled kernel; the launch options among kwargs, as (name, value) pairs)."""
        vals = list(args)
        if len(vals) < len(self.defaults):
            vals.extend(self.defaults[len(vals):])
        opts: tuple = ()
        for k, v in kwargs.items():
            i = self.index.get(k)
            if i is None:
                opts += ((k, v),)
            else:
                vals[i] = v
        return vals, opts

    def _launch(self, grid: Any, args: tuple, kwargs: dict) -> Any:
        vals, opts = self.bind(args, kwargs)
        key_parts = list(vals)
        for i in self.runtime:
            key_parts[i] = runtime_key(vals[i])
        if self._device is None:
            from triton.runtime.driver import driver

            self._device, self._stream = driver.active.get_current_device, driver.active.get_current_stream
        dev = self._device()
        key: tuple | None = (dev, opts, *key_parts)
        try:
            compiled = self.cache.get(key)
        except TypeError:  # an unhashable constexpr or option
            compiled, key = None, None
        if compiled is None or callable(grid) or not self._globals_unchanged():
            compiled = self.kernel[grid](*args, **kwargs)
            cacheable = (
                key is not None and not callable(grid) and not getattr(self.kernel, "pre_run_hooks", None)
                and not any(p is UNKEYED for p in key_parts) and not any(v is _EMPTY for v in vals)
            )
            # Bounded: a key that never compares equal (a NaN constexpr) must not grow it forever.
            cacheable = cacheable and len(self.cache) < MAX_KEYS
            if cacheable and hasattr(compiled, "run") and hasattr(compiled, "function"):
                self.cache[key] = compiled
            return compiled
        stream = self._stream(dev)
        hooks = self._hooks
        enter = hooks.launch_enter_hook if hooks is not None else None
        leave = hooks.launch_exit_hook if hooks is not None else None
        meta = compiled.launch_metadata(grid, stream, *vals) if enter is not None else None
        n = len(grid)
        compiled.run(
            grid[0], grid[1] if n > 1 else 1, grid[2] if n > 2 else 1, stream, compiled.function,
            compiled.packed_metadata, meta, enter, leave, *vals,
        )
        return compiled

    def _globals_unchanged(self) -> bool:
        # Triton refuses a launch once a global the kernel read at compile time has changed; a hit
        # here must not launch the stale kernel instead (the slow path raises Triton's error).
        for (name, _), (val, globals_dict) in getattr(self.kernel, "used_global_vals", {}).items():
            if globals_dict.get(name, UNKEYED) != val:
                return False
        return True


_LAUNCHERS: dict[int, tuple[Any, Any]] = {}  # id(kernel) -> (kernel, what `fast` returns)


def fast(kernel: Any) -> Any:
    """`kernel` behind a FastLauncher where that applies (module docstring), else `kernel` itself."""
    entry = _LAUNCHERS.get(id(kernel))
    if entry is not None and entry[0] is kernel:
        return entry[1]
    got = kernel
    if ENABLED and torch.cuda.is_available():
        from triton.runtime.jit import JITFunction

        from lowbit.kernels.quantize import interpret

        if type(kernel) is JITFunction and not interpret():
            got = FastLauncher(kernel)
    _LAUNCHERS[id(kernel)] = (kernel, got)
    return got
