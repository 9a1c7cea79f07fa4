"""torch's fused AdamW step, with the fp8 delayed-scaling layers' weights updated by our kernel,
which also writes each weight's fp8 pair for the next forward (lowbit.kernels.adamw_pair).

A compiled fp8 delayed-scaling model quantizes every QuantLinear weight in each forward (W for
fprop, W^T for dgrad), reading the fp32 weights the optimizer has just written. `WeightPairStep`
takes those weights out of torch's AdamW step: one kernel a weight updates it (lowbit's fp32 AdamW,
lowbit.optim.adamw.adamw_math) and writes its codes under the scale the next forward would have
used, then two launches redo first-call histories and roll every weight's amax into its history.
Each layer then holds `weight_pair_fresh = True`, and its traced forward reads the buffers instead
of quantizing (lowbit.nn.quant_linear_traced.prequantized_weights). The other parameters go through
the optimizer's own step, with the same clipping factor.

The optimizer's state keeps torch's layout (step, exp_avg, exp_avg_sq), so checkpoints are the
same either way. What differs from quantizing in the forward: the AdamW's rounding (the same
fp32 operations as torch's fused kernel in another order, a few ulps apart), the weight's amax
entering its history at the step (one call earlier), and under gradient
accumulation the weight's amax joins its history once a step rather than once a micro-batch (the
weight is the same in every micro-batch). Anything that changes the weights or histories outside
the step must call `invalidate`, after which the next forward quantizes. Under DDP each rank's step
writes the same pairs, so they stay out of DDP's buffer broadcast (lowbit.trainer.engines). A
checkpoint keeps the
amax each pair was made with (`checkpoint_state`); loading it calls `restore`, which writes those
pairs again, so a resumed run goes on bit for bit (its histories already hold the saving step's
weight amaxes, which quantizing in the forward would record a second time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from lowbit.nn.quant_linear_traced import _row
from lowbit.trainer.grad_clip import clip_factor, folds_clipping

if TYPE_CHECKING:
    from lowbit.kernels.adamw_pair import WeightPair
    from lowbit.nn.quant_linear import QuantLinear

_PAIR_BUFFERS = ("codes", "scale", "codes_t", "scale_t", "rec", "amax")
# Rows of QuantLinear.amax_history of W (fprop's operand B) and W^T (dgrad's operand B).
W_ROW, WT_ROW = _row("fprop", 2), _row("dgrad", 2)


def why_not_weight_pairs(layer: QuantLinear, group: dict | None) -> str | None:
    """Why the step cannot write `layer`'s weight pair (None: it can). `group`: the optimizer's
    param group holding the weight (None: not in the optimizer)."""
    from lowbit.kernels.adamw_pair import FORMATS
    from lowbit.nn.quant_linear_traced import why_not_traced

    r = layer.recipe
    w = layer.weight
    if r.amax_history <= 0:
        return f"recipe {r.name} has no delayed scaling"
    why = why_not_traced(r, layer.backend)
    if why is not None:
        return f"the layer is not traced: {why}"
    if r.fprop.b.fmt != r.dgrad.b.fmt or r.fprop.b.fmt not in FORMATS:
        return f"W and W^T in {r.fprop.b.fmt} / {r.dgrad.b.fmt}, not one fp8 format"
    if group is None:
        return "the weight is not in the optimizer"
    if not w.requires_grad or w.dtype != torch.float32 or w.dim() != 2 or not w.is_contiguous():
        return f"the weight is not a trainable contiguous fp32 matrix ({w.dtype}, {tuple(w.shape)})"
    if group.get("amsgrad") or group.get("maximize") or group.get("differentiable"):
        return "the param group uses amsgrad, maximize or differentiable"
    return None


class WeightPairStep:
    """The step of `optimizer` (torch.optim.AdamW, fused) with the weights of `model`'s eligible
    QuantLinears (`why_not_weight_pairs`) updated and quantized by lowbit.kernels.adamw_pair."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        from lowbit.kernels.adamw_pair import WeightPair
        from lowbit.nn.quant_linear import QuantLinear

        if not (isinstance(optimizer, torch.optim.AdamW) and folds_clipping(optimizer)):
            fused = [g.get("fused") for g in optimizer.param_groups]
            raise ValueError(f"WeightPairStep needs torch.optim.AdamW with fused=True, got "
                             f"{type(optimizer).__name__} (fused={fused})")
        self.optimizer = optimizer
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.layers: list[QuantLinear] = []
        self.names: list[str] = []
        self.skipped: dict[str, str] = {}
        for name, m in model.named_modules():
            if not isinstance(m, QuantLinear) or m.recipe.is_identity:
                continue
            why = why_not_weight_pairs(m, group_of.get(id(m.weight)))
            if why is None and self.layers and _kind(m) != _kind(self.layers[0]):
                first = _kind(self.layers[0])
                why = f"(format, history length) {_kind(m)} differs from the other layers' {first}"
            if why is not None:
                self.skipped[name] = why
                continue
            pair = WeightPair.empty(m.weight, m.recipe.fprop.b.fmt)
            for b in _PAIR_BUFFERS:
                m.register_buffer(f"weight_pair_{b}", getattr(pair, b), persistent=False)
            m.weight_pair_fresh = False
            self.layers.append(m)
            self.names.append(name)
        self._group = self._groups()
        self._steps: list[int] | None = None  # host copies of the layers' state["step"]
        self._tables: dict[tuple, torch.Tensor] = {}

    def buffers(self) -> list[torch.Tensor]:
        """The pair buffers the step writes (every layer's codes, scales, record and amax)."""
        return [getattr(m, f"weight_pair_{b}") for m in self.layers for b in _PAIR_BUFFERS]

    def invalidate(self) -> None:
        """The weights, histories or optimizer state changed outside `step` (a checkpoint load):
        the next forward quantizes each weight itself, and the step counts are read again."""
        for m in self.layers:
            m.weight_pair_fresh = False
        self._steps = None
        self._tables.clear()
        # optimizer.load_state_dict puts new dicts in param_groups: the old ones' lr no longer moves.
        self._group = self._groups()

    def _groups(self) -> list[dict]:
        group_of = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        return [group_of[id(m.weight)] for m in self.layers]

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint needs to resume bit for bit: for each layer whose pair the last step
        wrote, the amax its codes were made with (its history already holds the weight's own
        amax, which the next forward would otherwise record a second time)."""
        return {n: m.weight_pair_amax.detach().cpu().clone()
                for n, m in zip(self.names, self.layers) if m.weight_pair_fresh}

    def restore(self, state: dict[str, torch.Tensor]) -> None:
        """After loading a checkpoint's weights, histories and optimizer state: write the pairs
        of the layers `state` (a `checkpoint_state`) names again from their weights and amaxes,
        as the step that saved it had; the other layers' next forward quantizes them itself."""
        from lowbit.kernels.pair_quantize_op import fp8_tensor_pair_direct

        unknown = sorted(set(state) - set(self.names))
        if unknown:
            raise ValueError(f"weight-pair state names layers without a weight pair here: {unknown[:3]} "
                             f"(this model's: {self.names[:3]}...)")
        for n, a in state.items():  # all checked before any pair is written
            ok = isinstance(a, torch.Tensor) and a.numel() == 1 and bool(torch.isfinite(a).all())
            if not ok or a < 0:
                raise ValueError(f"weight-pair state of {n}: amax {a!r} is not one finite non-negative value")
        self.invalidate()
        for n, m in zip(self.names, self.layers):
            if n not in state:
                continue
            amax = state[n].to(device=m.weight.device, dtype=torch.float32)
            with torch.no_grad():
                data, scale, data_t, scale_t = fp8_tensor_pair_direct(m.weight, m.recipe.fprop.b.fmt, amax)
                for b, t in (("codes", data), ("codes_t", data_t), ("scale", scale), ("scale_t", scale_t),
                             ("amax", amax.reshape(()))):
                    getattr(m, f"weight_pair_{b}").copy_(t)
            m.weight_pair_fresh = True

    @staticmethod
    def _pair(m: QuantLinear) -> WeightPair:
        from lowbit.kernels.adamw_pair import WeightPair

        return WeightPair(**{b: getattr(m, f"weight_pair_{b}") for b in _PAIR_BUFFERS})

    def _state(self, k: int) -> dict:
        p = self.layers[k].weight
        st = self.optimizer.state[p]
        if not st:  # as torch's fused AdamW initializes it
            st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def _table(self, ks: tuple[int, ...]) -> torch.Tensor:
        # The batched launches' table of addresses, kept under the addresses themselves: a weight
        # or buffer that moved (model.to(), a load into new storage) gets a new table, never a
        # stale address.
        from lowbit.kernels.adamw_pair import pair_table

        entries = []
        for k in ks:
            m = self.layers[k]
            entries.append((m.weight, self._pair(m), m.amax_history[W_ROW], m.amax_history[WT_ROW]))
        key = tuple(t.data_ptr() for w, pr, ha, hb in entries for t in (w, pr.codes, pr.codes_t, pr.scale,
                                                                         pr.scale_t, pr.rec, pr.amax, ha))
        if key not in self._tables:
            self._tables.clear()
            self._tables[key] = pair_table(entries)
        return self._tables[key]

    def clip_and_step(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        """Clip the gradients of `params` to global norm `max_norm` (as lowbit.trainer.grad_clip)
        and step: the eligible weights here, the rest through the optimizer. Returns the norm."""
        from lowbit.kernels.adamw_pair import AdamWScalars, launch_finish, launch_step

        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
        gs = clip_factor(norm, max_norm)
        if self._steps is None:  # one read per weight after a start or a load, then host counts
            self._steps = [int(self._state(k)["step"]) for k in range(len(self.layers))]
        ours = tuple(k for k, m in enumerate(self.layers) if _steppable(m.weight))
        with torch.no_grad():
            for k in ours:
                m, g = self.layers[k], self._group[k]
                st = self._state(k)
                self._steps[k] += 1
                hp = AdamWScalars(float(g["lr"]), *map(float, g["betas"]), float(g["eps"]),
                                  float(g["weight_decay"]), self._steps[k])
                launch_step(m.weight, m.weight.grad, st["exp_avg"], st["exp_avg_sq"], gs, self._pair(m),
                            m.amax_history[W_ROW], m.recipe.fprop.b.fmt, hp)
            if ours:
                m0 = self.layers[ours[0]]
                launch_finish(self._table(ours), m0.amax_history.shape[1], m0.recipe.fprop.b.fmt)
                torch._foreach_add_([self._state(k)["step"] for k in ours], 1.0)
        for k, m in enumerate(self.layers):
            m.weight_pair_fresh = k in ours
        # The other parameters: the optimizer's own step, their gradients divided by the same factor.
        held = [(self.layers[k].weight, self.layers[k].weight.grad) for k in ours]
        for p, _ in held:
            p.grad = None
        try:
            if gs is not None:
                self.optimizer.grad_scale = gs
            self.optimizer.step()
        finally:
            if gs is not None:
                del self.optimizer.grad_scale
            for p, g in held:
                p.grad = g
        return norm


def _kind(m: QuantLinear) -> tuple[str, int]:
    # What one batched finish launch needs its weights to share.
    return m.recipe.fprop.b.fmt, m.amax_history.shape[1]


def _steppable(w: torch.Tensor) -> bool:
    # A gradient the kernel reads as it reads the weight (fp32, contiguous, same shape).
    g = w.grad
    return g is not None and g.dtype == torch.float32 and g.is_contiguous() and g.shape == w.shape

