"""AdamW with 32-, 8- or 4-bit states, for fp32 or pure-BF16 parameters.

- 8-bit (Dettmers et al.): both moments block-wise (256) with the dynamic exponent map.
- 4-bit (Li et al. 2023): first moment block-wise (128) with the signed 4-bit dynamic map; second
  moment rank-1 normalized (scale min(row max, col max)) with the linear map that excludes zero;
  1-D second moments fall back to block-wise (128) with the same linear map. The second moment is
  coded *rounding up* (never below its fp32 value): nearest rounding stored v up to 1.5x too low,
  which inflated m / sqrt(v) and made warm-up spike. The first moment is coded to the nearest
  value by default; `m_rounding="stochastic"` codes it by stochastic rounding instead (hash stream
  seeded per step and tensor). With nearest codes every nonzero value of the 4-bit map is a fixed
  point of m ← beta1 · m (0.9 · value never crosses the midpoint below), so the momentum of a
  coordinate whose gradient stops does not decay relative to its block; stochastic rounding removes
  that bias but adds noise, and did not reduce warm-up spikes over three seeds (docs/RESULTS.md),
  so it is not the default. 8-bit states: nearest.
- Tensors under `min_quant_numel` elements keep fp32 states: their memory is negligible and small
  tensors (norms, biases) are the most sensitive to quantization error.
- BF16 parameters are updated without an fp32 master copy: `bf16_rounding` = nearest, stochastic
  (hash stream seeded per step and tensor) or kahan (BF16 compensation buffer, +2 B/param).
- `paged=True` keeps the states of CUDA parameters in pinned host memory, streamed to the GPU tensor
  by tensor with the next tensor's copy overlapping the current step (for QLoRA-sized jobs); CPU
  parameters keep ordinary states.

The torch code here is the reference; on CUDA (or with `fused=True`) the 8/4-bit steps run the fused
Triton kernels of lowbit/kernels/optim_adamw_lowbit.py, which perform the same fp32 operations.
"""

from __future__ import annotations

import functools
import math
import struct
from collections.abc import Iterable
from typing import Any

import torch

from lowbit.optim import qmaps
from lowbit.optim.rounding import ROUNDING_MODES, lowbias32_int, step_seed, write_param_


def f32(x: float) -> float:
    """Round a Python float to the nearest fp32, so torch and Triton see the same scalar."""
    return _F32.unpack(_F32.pack(x))[0]


_F32 = struct.Struct("f")


def adam_scalars(lr: float, beta1: float, beta2: float, eps: float, wd: float, step: int) -> dict:
    """Per-step fp32 scalars shared by the reference and the kernels."""
    return {
        "beta1": f32(beta1),
        "omb1": f32(1 - beta1),
        "beta2": f32(beta2),
        "omb2": f32(1 - beta2),
        "step_size": f32(lr / (1 - beta1**step)),
        # A reciprocal, so that no tensor is divided by a scalar (torch may turn that into a
        # multiply on some backends and the kernels must match bit for bit).
        "inv_bc2_sqrt": f32(1 / math.sqrt(1 - beta2**step)),
        "eps": f32(eps),
        "decay": f32(1 - lr * wd),
    }


def check_adamw_hparams(
    lr: float, betas: tuple[float, float], eps: float, weight_decay: float, bf16_rounding: str
) -> None:
    """Raise ValueError naming the first bad AdamW hyperparameter and its valid range (shared by
    LowBitAdamW and Shampoo, whose grafted step is AdamW's). `not x >= 0` also rejects NaN."""
    if bf16_rounding not in ROUNDING_MODES:
        raise ValueError(f"bf16_rounding={bf16_rounding!r}; valid choices: {', '.join(ROUNDING_MODES)}")
    if not lr >= 0:
        raise ValueError(f"lr={lr}; must be >= 0")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        raise ValueError(f"betas={tuple(betas)}; must be two numbers, each in [0, 1)")
    if not eps > 0:
        raise ValueError(f"eps={eps}; must be > 0")
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay={weight_decay}; must be >= 0")


def adamw_math(
    p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: dict
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step in fp32, in the exact order of operations the kernels use."""
    m = m * s["beta1"] + g * s["omb1"]
    v = v * s["beta2"] + (g * g) * s["omb2"]
    denom = _sqrt_rn(v) * s["inv_bc2_sqrt"] + s["eps"]
    new_p = p * s["decay"] - (m / denom) * s["step_size"]
    return new_p, m, v


def foreach_adamw_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    ms: list[torch.Tensor],
    vs: list[torch.Tensor],
    s: dict,
) -> None:
    """`adamw_math` on many fp32 CUDA tensors with a few multi-tensor launches (the same IEEE ops
    in the same order, so the result is the per-tensor one); used for the small fp32-state tensors,
    which would otherwise cost a dozen launches each."""
    torch._foreach_mul_(ms, s["beta1"])
    torch._foreach_add_(ms, torch._foreach_mul(grads, s["omb1"]))
    gg = torch._foreach_mul(grads, grads)
    torch._foreach_mul_(gg, s["omb2"])
    torch._foreach_mul_(vs, s["beta2"])
    torch._foreach_add_(vs, gg)
    denom = torch._foreach_sqrt(vs)
    torch._foreach_mul_(denom, s["inv_bc2_sqrt"])
    torch._foreach_add_(denom, s["eps"])
    upd = torch._foreach_div(ms, denom)
    torch._foreach_mul_(upd, s["step_size"])
    torch._foreach_mul_(params, s["decay"])
    torch._foreach_sub_(params, upd)


@functools.lru_cache(maxsize=1024)
def _scalar_items(lr: float, beta1: float, beta2: float, eps: float, wd: float, step: int) -> tuple:
    """`adam_scalars` as a hashable tuple of items, computed once per (hyperparameters, step) rather
    than per tensor: it also keys the batching of tensors into multi-tensor launches."""
    return tuple(adam_scalars(lr, beta1, beta2, eps, wd, step).items())


M_ROUNDING_MODES = ("stochastic", "nearest")


def moment_seed(seed: int) -> int:
    """The first moment's rounding stream for a step's tensor seed (`step_seed`): distinct from the
    stream that rounds BF16 parameters with the same seed."""
    return lowbias32_int(seed ^ 0x2545F491)


def _sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded fp32 sqrt. torch's vectorized CPU sqrt may be off by an ulp; CUDA's is IEEE."""
    if x.is_cuda:
        return torch.sqrt(x)
    return torch.sqrt(x.double()).float()


class LowBitAdamW(torch.optim.Optimizer):
    """AdamW with `state_bits` ∈ {32, 8, 4} and BF16-parameter rounding `bf16_rounding`."""

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        state_bits: int = 8,
        bf16_rounding: str = "nearest",
        min_quant_numel: int = 4096,
        rank1: bool = True,
        seed: int = 0,
        fused: bool | None = None,
        paged: bool = False,
        m_rounding: str = "nearest",
    ) -> None:
        if state_bits not in (32, 8, 4):
            raise ValueError(f"state_bits={state_bits}; valid choices: 32, 8, 4")
        if m_rounding not in M_ROUNDING_MODES:
            raise ValueError(f"m_rounding={m_rounding!r}; valid choices: {', '.join(M_ROUNDING_MODES)}")
        check_adamw_hparams(lr, betas, eps, weight_decay, bf16_rounding)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, seed=seed)
        super().__init__(params, defaults)
        self.state_bits = state_bits
        self.bf16_rounding = bf16_rounding
        self.min_quant_numel = min_quant_numel
        self.rank1 = rank1
        self.fused = fused
        self.paged = paged
        # How the 4-bit first moment picks its code (8-bit states always round to nearest).
        self.m_rounding = m_rounding

    # ----------------------------------------------------------------- state layout
    def _quantized(self, p: torch.Tensor) -> bool:
        return self.state_bits < 32 and p.numel() >= self.min_quant_numel

    def _uses_rank1(self, p: torch.Tensor) -> bool:
        return self.state_bits == 4 and self.rank1 and p.dim() >= 2

    def _init_state(self, p: torch.Tensor, state: dict) -> None:
        state["step"] = 0
        n, dev = p.numel(), p.device
        if not self._quantized(p):
            state["exp_avg"] = torch.zeros(p.shape, dtype=torch.float32, device=dev)
            state["exp_avg_sq"] = torch.zeros(p.shape, dtype=torch.float32, device=dev)
        elif self.state_bits == 8:
            nb = -(-n // 256)
            state["exp_avg_codes"] = torch.full((n,), self._zero_code(8, True), dtype=torch.uint8, device=dev)
            state["exp_avg_absmax"] = torch.zeros(nb, dtype=torch.float32, device=dev)
            state["exp_avg_sq_codes"] = torch.zeros(n, dtype=torch.uint8, device=dev)
            state["exp_avg_sq_absmax"] = torch.zeros(nb, dtype=torch.float32, device=dev)
        else:
            nbytes = -(-n // 128) * 64  # qmaps.pack_nibbles layout
            # With scale 0 every code decodes to 0; zero bytes match the packing's padding.
            state["exp_avg_codes"] = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
            state["exp_avg_absmax"] = torch.zeros(-(-n // 128), dtype=torch.float32, device=dev)
            # Code 0 of the zero-free linear map is its smallest value; with scale 0 it decodes to 0.
            state["exp_avg_sq_codes"] = torch.zeros(nbytes, dtype=torch.uint8, device=dev)
            if self._uses_rank1(p):
                rows = p.shape[0]
                state["exp_avg_sq_row"] = torch.zeros(rows, dtype=torch.float32, device=dev)
                state["exp_avg_sq_col"] = torch.zeros(n // rows, dtype=torch.float32, device=dev)
            else:
                state["exp_avg_sq_absmax"] = torch.zeros(-(-n // 128), dtype=torch.float32, device=dev)
        if p.dtype == torch.bfloat16 and self.bf16_rounding == "kahan":
            state["kahan_comp"] = torch.zeros(p.shape, dtype=torch.bfloat16, device=dev)
        if self._is_paged(p):
            for k, v in state.items():
                if torch.is_tensor(v):
                    state[k] = v.cpu().pin_memory()

    def _is_paged(self, p: torch.Tensor) -> bool:
        """Paging applies to CUDA parameters only: the states of any other keep the parameter's device."""
        return self.paged and p.is_cuda

    @staticmethod
    def _zero_code(bits: int, signed: bool) -> int:
        return int((qmaps.dynamic_map(bits, signed) == 0).nonzero()[0])

    # ----------------------------------------------------------------- dequantize / quantize
    def _load_moments(self, p: torch.Tensor, st: dict) -> tuple[torch.Tensor, torch.Tensor]:
        n, shape = p.numel(), p.shape
        if not self._quantized(p):
            return st["exp_avg"], st["exp_avg_sq"]
        if self.state_bits == 8:
            m = qmaps.dequantize_blockwise(
                st["exp_avg_codes"], st["exp_avg_absmax"], qmaps.dynamic_map(8, True), 256, shape
            )
            v = qmaps.dequantize_blockwise(
                st["exp_avg_sq_codes"], st["exp_avg_sq_absmax"], qmaps.dynamic_map(8, False), 256, shape
            )
            return m, v
        m_codes = qmaps.unpack_nibbles(st["exp_avg_codes"], n)
        m = qmaps.dequantize_blockwise(m_codes, st["exp_avg_absmax"], qmaps.dynamic_map(4, True), 128, shape)
        v_codes = qmaps.unpack_nibbles(st["exp_avg_sq_codes"], n)
        lin = qmaps.linear_map_nozero(4)
        if self._uses_rank1(p):
            v = qmaps.dequantize_rank1(v_codes, st["exp_avg_sq_row"], st["exp_avg_sq_col"], lin).view(shape)
        else:
            v = qmaps.dequantize_blockwise(v_codes, st["exp_avg_sq_absmax"], lin, 128, shape)
        return m, v

    def _store_moments(
        self, p: torch.Tensor, st: dict, m: torch.Tensor, v: torch.Tensor, seed: int = 0
    ) -> None:
        if not self._quantized(p):
            st["exp_avg"].copy_(m)
            st["exp_avg_sq"].copy_(v)
            return
        if self.state_bits == 8:
            c, a = qmaps.quantize_blockwise(m, qmaps.dynamic_map(8, True), 256)
            st["exp_avg_codes"].copy_(c)
            st["exp_avg_absmax"].copy_(a)
            c, a = qmaps.quantize_blockwise(v, qmaps.dynamic_map(8, False), 256)
            st["exp_avg_sq_codes"].copy_(c)
            st["exp_avg_sq_absmax"].copy_(a)
            return
        sr_seed = moment_seed(seed) if self.m_rounding == "stochastic" else None
        c, a = qmaps.quantize_blockwise(m, qmaps.dynamic_map(4, True), 128, sr_seed=sr_seed)
        st["exp_avg_codes"].copy_(qmaps.pack_nibbles(c))
        st["exp_avg_absmax"].copy_(a)
        lin = qmaps.linear_map_nozero(4)
        if self._uses_rank1(p):
            c, row, col = qmaps.quantize_rank1(v.reshape(p.shape[0], -1), lin, round_up=True)
            st["exp_avg_sq_row"].copy_(row)
            st["exp_avg_sq_col"].copy_(col)
        else:
            c, a = qmaps.quantize_blockwise(v, lin, 128, round_up=True)
            st["exp_avg_sq_absmax"].copy_(a)
        st["exp_avg_sq_codes"].copy_(qmaps.pack_nibbles(c))

    # ----------------------------------------------------------------- step
    def _fused_kind(self, p: torch.Tensor, want: bool | None = None) -> str | None:
        """The fused kernel kind for `p` ("32", "8", "4flat", "4rank1"), or None for torch ops.
        `want`: whether fused kernels are wanted for `p` (its device's answer, when the caller
        already has it: the check below costs an import and an environment lookup)."""
        if want is None:
            want = (p.is_cuda and _triton_available()) if self.fused is None else self.fused
        if not want:
            return None
        kind = _kernels().kind_of(self, p)
        if kind is not None and not p.is_cuda and not _interpret():
            # Caught here: Triton's own error for a CPU tensor ("0 active drivers") names neither.
            raise ValueError(
                f"fused=True runs Triton kernels, which need CUDA tensors (or TRITON_INTERPRET=1); got a "
                f"parameter on {p.device}. Use fused=None (fused where possible) or fused=False."
            )
        return kind

    def _use_fused(self, p: torch.Tensor) -> bool:
        return self._fused_kind(p) is not None

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # Work items (param, state, scalars as a tuple of items, seed args). This loop runs over
        # every parameter each step, so it only does per-tensor bookkeeping: the scalars are
        # computed once per (group, step) and the seeds only where a rounding stream reads them.
        work = []
        index = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            hp = (group["lr"], beta1, beta2, group["eps"], group["weight_decay"])
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("LowBitAdamW does not support sparse gradients")
                st = self.state[p]
                if not st:
                    self._init_state(p, st)
                st["step"] += 1
                work.append((p, st, _scalar_items(*hp, st["step"]), (group["seed"], st["step"], index)))
        paged: dict[torch.device, list[tuple]] = {}
        for w in work:
            if self._is_paged(w[0]):
                paged.setdefault(w[0].device, []).append(w)
        for items in paged.values():
            self._paged_update(items)
        self._update([w for w in work if not self._is_paged(w[0])])
        return loss

    def _update(self, work: list[tuple]) -> None:
        """Apply the step to (param, state, scalar items, seed args) items: fused kernels batched
        per kind, small fp32 CUDA tensors with multi-tensor ops, the rest with the torch reference."""
        batches: dict[tuple, tuple[list, list, list, list]] = {}
        fused: dict[tuple, list] = {}
        wants: dict[torch.device, bool] = {}  # fused wanted, per device (asked once per step)
        for p, st, s_items, seed_args in work:
            dev = p.device
            want = wants.get(dev)
            if want is None:
                want = wants[dev] = (p.is_cuda and _triton_available()) if self.fused is None else self.fused
            kind = self._fused_kind(p, want) if want else None
            if kind is not None:
                fused.setdefault((kind, p.dtype, dev, s_items), []).append((p, p.grad, st, seed_args))
                continue
            if p.is_cuda and p.dtype == torch.float32 and "exp_avg" in st:
                batch = batches.setdefault(s_items, ([], [], [], []))
                for lst, t in zip(batch, (p, p.grad, st["exp_avg"], st["exp_avg_sq"])):
                    lst.append(t)
                continue
            s = dict(s_items)
            seed = step_seed(*seed_args)
            m, v = self._load_moments(p, st)
            old = p.detach().float()
            new_p, m, v = adamw_math(old, p.grad.float(), m, v, s)
            self._store_moments(p, st, m, v, seed)
            write_param_(p, new_p, self.bf16_rounding, seed, st.get("kahan_comp"), old)
        for (kind, _, _, scalars), items in fused.items():
            _kernels().fused_adamw_multi_(self, kind, items, dict(scalars))
        for scalars, (ps, gs, ms, vs) in batches.items():
            foreach_adamw_(ps, [g.float() for g in gs], ms, vs, dict(scalars))

    def _paged_update(self, work: list[tuple]) -> None:
        """Paged states: they live in pinned host memory; each tensor's states are copied to the GPU
        on a side stream while the previous tensor is stepped, then written back asynchronously."""
        dev = work[0][0].device  # all on this CUDA device (step pages only CUDA parameters)
        side = torch.cuda.Stream(dev)
        main = torch.cuda.current_stream(dev)
        side.wait_stream(main)

        def fetch(st: dict) -> tuple[dict, torch.cuda.Event]:
            with torch.cuda.stream(side):
                d = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in st.items()}
                ev = torch.cuda.Event()
                ev.record(side)
            return d, ev

        nxt = fetch(work[0][1])
        for i, (p, st, s, seed) in enumerate(work):
            cur, ev = nxt
            if i + 1 < len(work):
                nxt = fetch(work[i + 1][1])
            main.wait_event(ev)
            for v in cur.values():
                if torch.is_tensor(v):
                    v.record_stream(main)  # allocated on the side stream, used on this one
            self._update([(p, cur, s, seed)])
            for k, v in cur.items():
                if torch.is_tensor(v):
                    st[k].copy_(v, non_blocking=True)
        main.synchronize()  # host copies complete before anyone (the next prefetch, a checkpoint) reads them

    # ----------------------------------------------------------------- checkpoints
    def load_state_dict(self, state_dict: dict) -> None:
        """Load exactly: torch casts floating state to the parameter dtype, which would turn our
        fp32 scales and moments into BF16 for BF16 parameters; restore their saved dtypes."""
        super().load_state_dict(state_dict)
        restore_state_dtypes(self, state_dict)
        # torch moved the states to the parameters' device; paged ones (of CUDA parameters) live on the host
        for p, st in self.state.items():
            if self._is_paged(p):
                for k, v in st.items():
                    if torch.is_tensor(v) and k != "step":
                        st[k] = v.cpu().pin_memory()

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (codes, scales, moments, compensation)."""
        return state_bytes(self)


def restore_state_dtypes(opt: torch.optim.Optimizer, state_dict: dict) -> None:
    """Undo torch's cast of floating state to the parameter dtype: saved fp32 moments and scales
    of BF16 parameters come back as fp32 (the dtypes they were saved with)."""
    params = [p for g in opt.param_groups for p in g["params"]]
    for idx, saved in state_dict["state"].items():
        p = params[idx]
        for key, val in saved.items():
            if torch.is_tensor(val) and val.dtype != opt.state[p][key].dtype:
                opt.state[p][key] = val.to(device=p.device, copy=True)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held in all tensors of `opt`'s state."""
    total = 0
    for st in opt.state.values():
        for val in st.values():
            if torch.is_tensor(val):
                total += val.numel() * val.element_size()
    return total


@functools.cache
def _kernels() -> Any:
    """The fused-kernel module, imported on first use (lowbit.optim runs without Triton)."""
    from lowbit.kernels import optim_adamw_lowbit

    return optim_adamw_lowbit


def _interpret() -> bool:
    from lowbit.kernels.quantize import interpret

    return interpret()


def _triton_available() -> bool:
    from lowbit.kernels.quantize import triton_available  # lazy: lowbit.optim does not need kernels

    return triton_available()


class AdamW8bit(LowBitAdamW):
    """AdamW with both moments in 8 bits (block 256, dynamic exponent map)."""

    def __init__(self, params: Iterable, **kwargs: Any) -> None:
        super().__init__(params, state_bits=8, **kwargs)


class AdamW4bit(LowBitAdamW):
    """AdamW with 4-bit moments (block-128 dynamic first moment, rank-1 linear second moment)."""

    def __init__(self, params: Iterable, **kwargs: Any) -> None:
        super().__init__(params, state_bits=4, **kwargs)


class BF16AdamW(LowBitAdamW):
    """AdamW for BF16 parameters without an fp32 master copy; fp32 states, stochastic rounding."""

    def __init__(self, params: Iterable, bf16_rounding: str = "stochastic", **kwargs: Any) -> None:
        super().__init__(params, state_bits=32, bf16_rounding=bf16_rounding, **kwargs)
