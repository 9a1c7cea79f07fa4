"""Training recipes: for each GEMM of a linear layer, how each operand is quantized.

A linear layer Y = X·W^T runs three GEMMs. Each is written as out = A·B^T with the reduction axis
K last in both operands, so every spec below quantizes along its GEMM's reduction axis:
    fprop  Y  = X   · W^T      A = X   (tokens × in)    B = W   (out × in)
    dgrad  dX = dY  · W        A = dY  (tokens × out)   B = W^T (in × out)
    wgrad  dW = dY^T· X        A = dY^T (out × tokens)  B = X^T (in × tokens)

Facts the recipes encode (from the papers and projects named; our own code):
    fp8_tensorwise  per-tensor current scaling; E4M3 forward, E5M2 gradients; cuBLAS fast
                    accumulation in the forward GEMM only (TE / torchao defaults).
    fp8_delayed     the same with scales from a 16-step amax history (TE DelayedScaling).
    fp8_rowwise     one scale per row along K, E4M3 everywhere (torchao "rowwise").
    fp8_blockwise   1×128 blocks for activations/gradients, 128×128 tiles for weights, E4M3
                    (DeepSeek-V3).
    mxfp8           OCP MX: E4M3 blocks of 32 along K with E8M0 scales, every operand.
    mxfp4           E2M1 blocks of 32, E8M0 scales; forward nearest; backward operands rotated
                    by a 32-wide random Hadamard (signs redrawn per call) and stochastically
                    rounded, with the round-up E8M0 scale so SR never saturates (Tseng et al. 2025;
                    Quartet).
    nvfp4           E2M1 blocks of 16, E4M3 block scales + fp32 tensor scale, 16×16 weight tiles,
                    SR on gradients, 16-wide random Hadamard on the wgrad operands (TE NVFP4).
    int8            symmetric int8, one fp32 scale per row along K, all GEMMs (SwitchBack-like).
    int4            plain symmetric int4 per row, all GEMMs: the ablation baseline for int4_hq.
    int4_hq         Xi et al. 2023: Hadamard quantizer (int4 per row after a 32-wide Hadamard) on
                    every GEMM; gradients bit-split into two int4 terms (high + residual); the
                    wgrad reduction over tokens keeps half the terms by leverage-score sampling
                    (keep ∝ ||grad term||·||activation row||, reweighted by 1/p: unbiased).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from lowbit.quant.quantize import QuantSpec

GEMMS = ("fprop", "dgrad", "wgrad")
# Telemetry / error-message names of each GEMM's operands (A, B).
OPERAND_NAMES = {"fprop": ("x", "w"), "dgrad": ("dy", "w"), "wgrad": ("dy", "x")}


@dataclass(frozen=True)
class GemmSpec:
    a: QuantSpec | None = None  # None: the operand stays in high precision (fp32 math)
    b: QuantSpec | None = None
    hadamard: int = 0  # width of the blockwise Hadamard along K applied to both operands; 0 = off
    random_signs: bool = True  # random ±1 diagonal, redrawn every call (else a fixed Hadamard)
    bit_split: bool = False  # A = hi + lo: two terms in A's format (the second is the residual)
    leverage_sampling: bool = False  # keep half of the K-terms of A·B^T ∝ norms, reweighted 1/p
    # cuBLAS fp8 "fast accumulation" (no periodic promotion of the tensor-core sums to fp32): what
    # TransformerEngine and torchao use for the forward GEMM; gradients keep full fp32 accumulation.
    # Only cuBLAS reads it; every other backend accumulates in fp32.
    fast_accum: bool = False

    @property
    def quantized(self) -> bool:
        return self.a is not None or self.b is not None

    @property
    def stochastic(self) -> bool:
        return any(s is not None and s.rounding == "stochastic" for s in (self.a, self.b))


@dataclass(frozen=True)
class Recipe:
    name: str
    fprop: GemmSpec = field(default_factory=GemmSpec)
    dgrad: GemmSpec = field(default_factory=GemmSpec)
    wgrad: GemmSpec = field(default_factory=GemmSpec)
    amax_history: int = 0  # > 0: delayed scaling of block='tensor' operands from this many steps

    @property
    def is_identity(self) -> bool:
        return not any(getattr(self, g).quantized for g in GEMMS)

    def gemm(self, name: str) -> GemmSpec:
        _check_gemm_names([name])
        return getattr(self, name)

    def with_overrides(
        self,
        hadamard: list[str] | str | None = None,
        stochastic_rounding: list[str] | str | None = None,
        hadamard_block: int = 0,
    ) -> Recipe:
        """Ablations: `hadamard` / `stochastic_rounding` list exactly the GEMMs that get them
        (a single name such as "wgrad" is taken as a one-element list).

        None keeps the recipe's choice; [] turns it off everywhere. A GEMM that gains a Hadamard
        uses `hadamard_block` (or its operands' 1-D block, or 32); `hadamard_block` > 0 also
        overrides the width of existing rotations. A GEMM that gains SR rounds its A operand (the
        gradient in dgrad/wgrad) stochastically.
        """
        out = self
        # A bare string is one GEMM name, not a sequence of one-letter names.
        if isinstance(hadamard, str):
            hadamard = [hadamard]
        if isinstance(stochastic_rounding, str):
            stochastic_rounding = [stochastic_rounding]
        for names in (hadamard, stochastic_rounding):
            if names is not None:
                _check_gemm_names(names)
        if hadamard_block < 0 or hadamard_block & (hadamard_block - 1):
            # Checked here, not at the first GEMM: a config typo should fail before training starts.
            raise ValueError(f"hadamard_block={hadamard_block}; valid: 0 (the recipe's) or a power of two")
        for g in GEMMS:
            spec = getattr(out, g)
            if not spec.quantized:
                continue
            if hadamard is not None:
                width = 0
                if g in hadamard:
                    width = hadamard_block or spec.hadamard or _default_hadamard(spec)
                spec = replace(spec, hadamard=width)
            elif hadamard_block and spec.hadamard:
                spec = replace(spec, hadamard=hadamard_block)
            if stochastic_rounding is not None:
                if g not in stochastic_rounding:
                    spec = replace(spec, a=_rounding(spec.a, "nearest"), b=_rounding(spec.b, "nearest"))
                elif not spec.stochastic:
                    spec = replace(spec, a=_rounding(spec.a, "stochastic"))
            out = replace(out, **{g: spec})
        return out


def _rounding(spec: QuantSpec | None, mode: str) -> QuantSpec | None:
    return None if spec is None else spec.with_rounding(mode)


def _default_hadamard(spec: GemmSpec) -> int:
    for s in (spec.a, spec.b):
        if s is not None and isinstance(s.block, int) and s.block & (s.block - 1) == 0:
            return s.block
    return 32


def _check_gemm_names(names: list[str]) -> None:
    for n in names:
        if n not in GEMMS:
            raise ValueError(f"unknown GEMM name {n!r}; valid choices: {', '.join(GEMMS)}")


def _same(spec: QuantSpec, **kw) -> GemmSpec:
    return GemmSpec(a=spec, b=spec, **kw)


def _build() -> dict[str, Recipe]:
    e4, e5 = QuantSpec("fp8_e4m3"), QuantSpec("fp8_e5m2")
    tensorwise = dict(fprop=GemmSpec(e4, e4, fast_accum=True), dgrad=GemmSpec(e5, e4), wgrad=GemmSpec(e5, e4))
    row = QuantSpec("fp8_e4m3", "row")
    b128, t128 = QuantSpec("fp8_e4m3", 128), QuantSpec("fp8_e4m3", (128, 128))
    mx8 = QuantSpec("fp8_e4m3", 32, "e8m0")
    mx4 = QuantSpec("fp4_e2m1", 32, "e8m0")
    mx4_sr = QuantSpec("fp4_e2m1", 32, "e8m0_up", "stochastic")
    nv, nv_sr = QuantSpec("fp4_e2m1", 16, "e4m3"), QuantSpec("fp4_e2m1", 16, "e4m3", "stochastic")
    nv_w = QuantSpec("fp4_e2m1", (16, 16), "e4m3")
    i8, i4 = QuantSpec("int8", "row"), QuantSpec("int4", "row")
    recipes = [
        Recipe("bf16"),
        Recipe("fp8_tensorwise", **tensorwise),
        Recipe("fp8_delayed", **tensorwise, amax_history=16),
        Recipe("fp8_rowwise", _same(row, fast_accum=True), _same(row), _same(row)),
        Recipe("fp8_blockwise", GemmSpec(b128, t128), GemmSpec(b128, t128), _same(b128)),
        Recipe("mxfp8", _same(mx8), _same(mx8), _same(mx8)),
        Recipe("mxfp4", _same(mx4), _same(mx4_sr, hadamard=32), _same(mx4_sr, hadamard=32)),
        Recipe("nvfp4", GemmSpec(nv, nv_w), GemmSpec(nv_sr, nv_w), GemmSpec(nv_sr, nv, hadamard=16)),
        Recipe("int8", _same(i8), _same(i8), _same(i8)),
        Recipe("int4", _same(i4), _same(i4), _same(i4)),
        Recipe(
            "int4_hq",
            _same(i4, hadamard=32, random_signs=False),
            _same(i4, hadamard=32, random_signs=False, bit_split=True),
            _same(i4, hadamard=32, random_signs=False, bit_split=True, leverage_sampling=True),
        ),
    ]
    return {r.name: r for r in recipes}


RECIPES: dict[str, Recipe] = _build()


def get_recipe(name: str | Recipe) -> Recipe:
    """The named recipe (see the module docstring); a Recipe passes through unchanged."""
    if isinstance(name, Recipe):
        return name
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; valid choices: {', '.join(RECIPES)}") from None
