"""Block-wise FP8 checkpoints (`quantization_config.quant_method: "fp8"`), and GPT-OSS's MXFP4
experts (`"mxfp4"`, at the end), dequantized on load.

DeepSeek-V3/R1, Kimi-K2 and Qwen3's `-FP8` releases store each linear weight as float8 (e4m3)
numbers `X.weight [R, C]` and one float32 scale per block of `weight_block_size` (rows, cols),
`X.weight_scale_inv [ceil(R / br), ceil(C / bc)]` (the last blocks of a row or column are
cut short); element (r, c) is `weight[r, c] * scale_inv[r // br, c // bc]`. Fused expert tensors
carry the expert as a leading dim on both. Tensors that are not float8 (embeddings, norms, the
router's gate) are read as they are.

moeray multiplies in the model's dtype, so weights are widened here, once, as transformers does
with `dequantize=True` (its CPU default): float32 product, then the model's dtype; the same
numbers where every size is a multiple of the block (transformers works the block out from the
scale grid and refuses cut-short blocks, such as DeepSeek-V3's kv_a_proj_with_mqa [576, 7168]
with scales [5, 56]). That costs 2x the checkpoint's memory in bf16; activations are never
quantized (the FP8 GEMMs of a GPU deployment quantize them per token group, and round otherwise).
Per-tensor FP8 exports (AutoFP8: `X.weight_scale`, `input_scale`) are refused by name.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e8m0fnu)  # "float" and "ue8m0" scales


@dataclass(frozen=True)
class Fp8Weights:
    """How a checkpoint's float8 weights are scaled (read by `families.common.common_fields`)."""

    block: tuple[int, int] | None  # (rows, cols) a scale covers; None: one scale per tensor


def scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """The `_scale_inv` shape that goes with a float8 weight of `weight_shape` (leading dims: experts)."""
    *lead, rows, cols = weight_shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def dequantize(weight: Tensor, scale_inv: Tensor, block: tuple[int, int] | None) -> Tensor:
    """float8 weight [..., R, C] times its block scales (see `scale_shape`) -> float32 [..., R, C].
    Multiplied in place, scales spread over rows only ([..., R, C / bc]): no second full-size tensor."""
    values, scales = weight.float(), scale_inv.float()
    if block is None:
        return values.mul_(scales.reshape(()))
    rows, cols = weight.shape[-2:]
    per_row = scales.repeat_interleave(block[0], dim=-2)[..., :rows, :]  # [..., R, ceil(C / bc)]
    whole = cols // block[1]
    values[..., :whole * block[1]].unflatten(-1, (whole, block[1])).mul_(per_row[..., :whole, None])
    if whole * block[1] < cols:
        values[..., whole * block[1]:].mul_(per_row[..., whole:])
    return values


# MXFP4 (OCP microscaling FP4), GPT-OSS's expert weights: blocks of 32 values share one power-of-two
# scale, a uint8 exponent biased by 127 (E8M0); each value is 4 bits, E2M1, two to a byte, the low
# nibble first. Every such value times its scale is exact in float32 and bf16, so widening loses nothing.
MXFP4_BLOCK = 32
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequantize_mxfp4(blocks: Tensor, scales: Tensor) -> Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 -> float32 [..., G * 32]: element 2j of block g
    is FP4_VALUES[blocks[g, j] & 15] * 2**(scales[g] - 127), element 2j + 1 the high nibble's."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 takes uint8 blocks [..., G, 16] and scales [..., G], got {blocks.dtype} "
                         f"{tuple(blocks.shape)} and {scales.dtype} {tuple(scales.shape)}")
    table = torch.tensor(FP4_VALUES, dtype=torch.float32)
    values = torch.stack((table[(blocks & 15).long()], table[(blocks >> 4).long()]), dim=-1)  # [..., G, 16, 2]
    values = values.flatten(-2)  # [..., G, 32]
    return torch.ldexp(values, scales.to(torch.int32).sub_(127).unsqueeze(-1)).flatten(-2)
