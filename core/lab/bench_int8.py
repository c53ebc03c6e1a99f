"""`python -m core bench --only int8`: SmolLM2-135M's decoding speed in fp32 and int8, and the ceiling.

Issue 18 asks for ≥ 60 tokens/s with int8 on 2 CPU cores. A decoding step reads every weight once
(batch 1), so it is bounded by how fast this machine streams them through PyTorch's int8 kernel
(fbgemm's `quantized::linear_dynamic`). This piece measures, on a stand-in with SmolLM2's shapes
and random weights (no file needed; speed does not depend on the values):

- `int8_decode_tokens_per_s`: greedy decoding with the KV cache through `int8_model(..., "smooth")`,
  each step through the decoding twin (`core.lab.fast_decode`), as page 3 measures it;
  `int8_textbook_decode_tokens_per_s`: the same through the model's own modules;
- `int8_linears_tokens_per_s`: the same 121 int8 matrix-vector products a token needs, and nothing
  else: no norm, RoPE, attention or Python around them. No decoder can beat it on this machine with
  these kernels;
- `fp32_decode_tokens_per_s` and `fp32_linears_tokens_per_s`: the same two in fp32, for the ratio.
"""

from __future__ import annotations

import time

import torch

from core.gpt.config import GPTConfig
from core.gpt.model import GPT
from core.lab import quantize
from core.lab.bench import cpu_share
from core.lab.device import configure_threads


def smollm2_shaped(quick: bool = False) -> GPTConfig:
    """SmolLM2-135M's shapes (30 blocks × 576, SwiGLU 1536, 9 query / 3 key-value heads, 49,152 tokens);
    `quick`: 2 blocks and 1,000 tokens, to check the piece runs."""
    return GPTConfig(vocab_size=1000 if quick else 49152, context_length=256, n_embd=576, n_head=9,
                     n_layer=2 if quick else 30, n_kv_head=3, ffn_hidden=1536, position="rope",
                     norm="rmsnorm", mlp="swiglu", bias=False, qkv_bias=False, tie_weights=True,
                     rope_base=100000.0)


def _linears_alone(model: torch.nn.Module, repeats: int) -> float:
    """Best seconds for one row through every Linear of `model` in turn (one token's products)."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, quantize.TokenGroupedInt8))]
    rows = {n: torch.randn(1, 1, n) for n in {m.in_features for m in layers}}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms the kernels up
            start = time.perf_counter()
            for layer in layers:
                layer(rows[layer.in_features])
            best = min(best, time.perf_counter() - start)
    return best


def int8_decode(quick: bool = False, new_tokens: int = 32, repeats: int = 3) -> dict:
    """Decoding tokens/s and the linears-only ceiling, fp32 and int8-smooth, on SmolLM2's shapes."""
    configure_threads()
    torch.manual_seed(0)
    model = GPT(smollm2_shaped(quick)).eval()
    ids = torch.randint(model.config.vocab_size, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    variants = {"fp32": model, "int8": quantize.int8_model(model, "smooth", ids)}
    out: dict = {"threads": torch.get_num_threads(), "parameters": model.num_parameters(),
                 "int8_weight_mb": round(quantize.weight_bytes(model, "int8-smooth") / 1e6, 1),
                 "fp32_weight_mb": round(quantize.weight_bytes(model, "fp32") / 1e6, 1)}
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    for name, variant in variants.items():
        speeds = [quantize.decode_speed(variant, ids[:16], 4 if quick else new_tokens)["tokens_per_s"]
                  for _ in range(1 if quick else repeats)]
        out[f"{name}_decode_tokens_per_s"] = round(max(speeds), 1)
        textbook = [quantize.decode_speed(variant, ids[:16], 4 if quick else new_tokens, fast=False)["tokens_per_s"]
                    for _ in range(1 if quick else repeats)]
        out[f"{name}_textbook_decode_tokens_per_s"] = round(max(textbook), 1)
        out[f"{name}_linears_tokens_per_s"] = round(1 / _linears_alone(variant, 1 if quick else repeats), 1)
    share = cpu_share(time.process_time() - cpu_start, time.perf_counter() - wall_start, torch.device("cpu"))
    out["cpu_share"] = round(share, 3)
    # The share of a step spent outside the matrix products (norms, RoPE, attention, Python).
    out["int8_overhead_share"] = round(1 - out["int8_decode_tokens_per_s"] / out["int8_linears_tokens_per_s"], 2)
    return out
