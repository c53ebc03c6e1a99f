"""Quantization: keep each weight in fewer bits, and turn it back into a number when computing.

A 135M-parameter model in fp32 is 540 MB, and generating one token reads every one of those bytes:
on a laptop CPU that reading, not the arithmetic, sets the speed. Store the weights in 8 or 4 bits
and there is 4-8x less to read. The price is a small rounding error in every weight.

Two schemes, both "weight-only" (activations stay fp32):

- **Q4_1**, llama.cpp's 4-bit blocks (what SmolLM2's GGUF file stores). Each row of a matrix is
  cut into blocks of 32 weights. A block keeps one scale `d` and one minimum `m` (fp16 each) and,
  for every weight, a 4-bit integer `q` in 0..15:

        w  ≈  d · q + m          (q = 0 is the block's minimum, q = 15 its maximum)

  20 bytes for 32 weights (2 + 2 + 16): 5 bits a weight, against 32 in fp32.
  The 16 bytes of `q` are packed two to a byte: byte j holds weight j in its low 4 bits and
  weight j + 16 in its high 4 bits.

- **int8 per row**: one scale per output row, `scale = max |w| / 127`, `q = round(w / scale)` in
  -127..127, and `w ≈ q · scale`. 8 bits a weight, and a CPU multiplies int8 weights with fast
  kernels (weight-only: activations stay fp32; PyTorch's `quantize_dynamic` also rounds the
  activations to 8 bits, which is faster on long inputs and less accurate).

A test checks these functions against the `gguf` package's own (de)quantizer and on real blocks.
"""

from __future__ import annotations

import torch

Q4_1_BLOCK = 32  # weights per block
Q4_1_BLOCK_BYTES = 20  # fp16 scale + fp16 minimum + 32 four-bit integers


def dequantize_q4_1_block(block: torch.Tensor) -> torch.Tensor:
    """One Q4_1 block (20 bytes, uint8) -> its 32 weights (fp32): w = d * q + m."""
    d = block[0:2].view(torch.float16).float()  # the scale, shared by the 32 weights
    m = block[2:4].view(torch.float16).float()  # the minimum, shared too
    packed = block[4:20]  # 16 bytes, two 4-bit integers in each
    low = packed & 0x0F  # weights 0..15
    high = packed >> 4  # weights 16..31
    q = torch.cat([low, high]).float()  # (32,) integers 0..15
    return d * q + m


def quantize_q4_1_block(weights: torch.Tensor) -> torch.Tensor:
    """32 weights (fp32) -> one Q4_1 block (20 bytes, uint8), rounding as llama.cpp does."""
    w = weights.float()
    lo, hi = w.min(), w.max()
    d = (hi - lo) / 15  # 16 levels from the minimum to the maximum
    inv = 1.0 / d if d != 0 else torch.tensor(0.0)
    q = torch.trunc((w - lo) * inv + 0.5).clamp(0, 15).to(torch.uint8)  # (32,)
    packed = q[:16] | (q[16:] << 4)  # weight j low, weight j + 16 high
    d16 = d.to(torch.float16).reshape(1).view(torch.uint8)
    m16 = lo.to(torch.float16).reshape(1).view(torch.uint8)
    return torch.cat([d16, m16, packed])


def q4_1_round_trip(matrix: torch.Tensor) -> torch.Tensor:
    """What a weight matrix becomes after Q4_1 storage: each run of 32 weights in a row quantized
    on its own and turned back into numbers (rows must be a multiple of 32 long)."""
    rows, cols = matrix.shape
    blocks = matrix.float().reshape(-1, Q4_1_BLOCK)  # (rows * cols / 32, 32)
    lo = blocks.min(dim=1, keepdim=True).values
    d = (blocks.max(dim=1, keepdim=True).values - lo) / 15
    inv = torch.where(d == 0, torch.zeros_like(d), 1.0 / d)
    q = torch.trunc((blocks - lo) * inv + 0.5).clamp(0, 15)
    d, lo = d.half().float(), lo.half().float()  # the file keeps d and m in fp16
    return (d * q + lo).reshape(rows, cols)


def quantize_int8_rows(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 (rows, cols), scale (rows, 1)) with matrix ≈ q * scale, one scale per row."""
    scale = matrix.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / 127
    q = torch.round(matrix / scale).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8_rows(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """int8 integers and their row scales -> fp32 weights."""
    return q.float() * scale


def rounding_error(original: torch.Tensor, restored: torch.Tensor) -> dict:
    """How far quantization moved the weights: largest and typical (RMS) error, and the RMS error
    as a fraction of the weights' own RMS size."""
    diff = (restored.float() - original.float()).flatten()
    rms = original.float().pow(2).mean().sqrt().item()
    rms_error = diff.pow(2).mean().sqrt().item()
    return {"max_abs_error": diff.abs().max().item(), "rms_error": rms_error,
            "relative_rms_error": rms_error / rms if rms else 0.0}


# ---------------------------------------------------------------------------- smoothing (SmoothQuant)
#
# Rounding activations to 8 bits shares one scale across a whole activation vector. A few input
# channels with huge values (SmolLM2's feed-forward has them) then set that scale, and every other
# channel is left with a handful of levels. SmoothQuant (Xiao et al., 2022) moves the difficulty
# from the activations into the weights, where one scale per row absorbs it: for a Linear y = W x,
#
#     y = (W · diag(s)) (diag(s)⁻¹ x)          exactly, for any positive s (one per input channel j)
#
# so the activations are divided by s_j and column j of W is multiplied by s_j. Choosing
#     s_j = max|x_j|^α / max|W[:, j]|^(1 - α)        (α = 0.5: half the difficulty each)
# evens out both ranges. The division by s costs nothing at run time: it is folded into whatever
# produced x (a norm's weight, or the `up` half of SwiGLU, whose product with the gate is x).


def smoothing_scales(activation_max: torch.Tensor, weight: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """s (in_features,) for a Linear with `weight` (out, in) whose inputs reached `activation_max`
    (in,) on calibration text: s_j = max|x_j|^alpha / max_i |W_ij|^(1 - alpha)."""
    weight_max = weight.abs().amax(dim=0).clamp(min=1e-5)  # (in,) the largest weight reading channel j
    s = activation_max.clamp(min=1e-5).pow(alpha) / weight_max.pow(1 - alpha)
    return s.clamp(min=1e-5)


BITS_PER_WEIGHT = {"fp32": 32.0, "int8": 8.0, "int8-dynamic": 8.0, "int8-smooth": 8.0,
                   "q4_1": Q4_1_BLOCK_BYTES * 8 / Q4_1_BLOCK}
