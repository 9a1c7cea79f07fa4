"""QTensor: quantized elements in a compact storage dtype, their scales, and the way back to floats.

Storage (one tensor, `data`, laid out like the input with the quantized axis moved last):
    fp8_e4m3 / fp8_e5m2      torch.float8_e4m3fn / torch.float8_e5m2 (1 byte)
    fp6_e3m2 / fp6_e2m3      torch.float8_e4m3fn holding the fp6 value exactly (1 byte; not bit-packed)
    fp4_e2m1, int4, nf4      two 4-bit codes per uint8, element 2i in the low nibble (when the last
                             dim is even; otherwise one code per byte). fp4 codes are the OCP E2M1
                             bits (sign, 2 exponent bits, 1 mantissa bit); int4 codes are two's
                             complement; nf4 codes index the NF4 codebook.
    int8                     torch.int8
Formats without a NaN code store 0 for a NaN element; the block's scale is NaN in that case (see
scaling.py), so dequantize still returns NaN.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from lowbit.quant.formats import ElementFormat, cached_constant, device_table

_FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@functools.lru_cache(maxsize=8)
def _fp4_code_lut(device: torch.device) -> torch.Tensor:
    lut = torch.zeros(13, dtype=torch.uint8)
    for code, mag in enumerate(_FP4_MAGNITUDES):
        lut[int(mag * 2)] = code
    return lut.to(device)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(..., K) uint8 codes < 16 with K even -> (..., K/2) bytes, element 2i in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (..., K/2) bytes -> (..., K) uint8 codes."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def encode(values: torch.Tensor, fmt: ElementFormat) -> tuple[torch.Tensor, bool]:
    """fp32 grid values -> (storage tensor, packed?). Exact: every value is already on the grid."""
    if fmt.name == "fp8_e5m2":
        return values.to(torch.float8_e5m2), False
    if fmt.kind == "float" and fmt.bits > 4:
        return values.to(torch.float8_e4m3fn), False
    v = torch.nan_to_num(values, nan=0.0)
    if fmt.name == "int8":
        return v.to(torch.int8), False
    if fmt.name == "int4":
        codes = (v.to(torch.int16) & 0xF).to(torch.uint8)
    elif fmt.kind == "codebook":
        table = device_table(fmt.codebook, v.device)
        codes = torch.bucketize(v, table).to(torch.uint8)
    else:  # fp4_e2m1: 2|v| is an integer in {0,1,2,3,4,6,8,12}; a 13-entry table maps it to the code
        lut = cached_constant(_fp4_code_lut, v.device)
        codes = lut[(v.abs() * 2).to(torch.int64)] | (torch.signbit(v).to(torch.uint8) << 3)
    if codes.dim() > 0 and codes.shape[-1] % 2 == 0:  # (a 0-d tensor has no last dim to pack)
        return pack_nibbles(codes), True
    return codes, False


def decode(data: torch.Tensor, fmt: ElementFormat, packed: bool) -> torch.Tensor:
    """Storage tensor -> fp32 grid values."""
    if data.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.int8):
        return data.float()
    codes = unpack_nibbles(data) if packed else data
    c = codes.long()
    if fmt.name == "int4":
        return torch.where(c >= 8, c - 16, c).float()
    if fmt.kind == "codebook":
        return device_table(fmt.codebook, data.device)[c]
    mag = device_table(_FP4_MAGNITUDES, data.device)[c & 7]
    return torch.where(c >= 8, -mag, mag)


def expand_scale(scale: torch.Tensor, block: int | tuple[int, int] | str, shape: torch.Size) -> torch.Tensor:
    """Broadcast per-group scales back to the element shape (quantized axis last)."""
    if block == "tensor":
        return scale.expand(shape)
    if block == "row":
        return scale.unsqueeze(-1).expand(shape)
    if isinstance(block, int):
        return scale.repeat_interleave(block, dim=-1)[..., : shape[-1]]
    br, bc = block
    return scale.repeat_interleave(br, dim=0).repeat_interleave(bc, dim=1)[: shape[0], : shape[1]]


@dataclass
class QTensor:
    data: torch.Tensor  # compact storage, quantized axis last (see the module docstring)
    scale: torch.Tensor  # fp32 per-group scales (block scales for e4m3)
    fmt: ElementFormat
    block: int | tuple[int, int] | str
    shape: torch.Size  # element shape with the quantized axis last
    axis: int  # where the quantized axis sits in the original tensor
    dtype: torch.dtype  # dtype of the original tensor
    packed: bool = False
    tensor_scale: torch.Tensor | None = None  # fp32 per-tensor scale (NVFP4's e4m3 scales)

    def values(self) -> torch.Tensor:
        """Element values as fp32, quantized axis last, before scaling."""
        v = decode(self.data, self.fmt, self.packed)
        return v[..., : self.shape[-1]] if v.shape[-1] != self.shape[-1] else v

    def expanded_scale(self) -> torch.Tensor:
        """The fp32 factor each element is multiplied by on the way back (quantized axis last)."""
        s = self.scale if self.tensor_scale is None else self.scale * self.tensor_scale
        return expand_scale(s, self.block, self.shape)

    def dequantize_lastdim(self) -> torch.Tensor:
        """fp32 values with the quantized axis last (what a GEMM along that axis consumes)."""
        return self.values() * self.expanded_scale()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor this QTensor stands for, in the original layout and dtype (or `dtype`)."""
        return self.dequantize_lastdim().movedim(-1, self.axis).to(dtype or self.dtype)

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size() + self.scale.numel() * 4
        return n + (4 if self.tensor_scale is not None else 0)
