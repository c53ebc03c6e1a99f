"""A fast twin of one cached decoding step, for generation speed (issue 18).

The textbook step (`core.gpt.generate.next_logits` → `GPT._last_logits` with a `KVCache`) runs the
model's modules: about 20 module calls, 4 views and a rotate-half per block. On a 135 M model in
int8 that Python and dispatch work is half of each token's time (`python -m core bench --only int8`).
This twin computes the same numbers for one new token with the fewest tensor operations:

- each Linear becomes the one kernel call it makes anyway (`F.linear`, or fbgemm's
  `quantized::linear_dynamic` for an int8 copy), looked up once;
- the norms are single `F.rms_norm` / `F.layer_norm` calls;
- RoPE for the one position is `x·cos + swap(x)·sin±`, where the halves' swap is one `flip` and the
  sign of rotate-half lives in a precomputed sin table;
- the new key and value are written straight into the model's own `KVCache`, so the prompt is
  prefilled by the textbook path and the two can be mixed step by step.

tests/test_fast_decode.py checks that every step's logits equal the textbook step's, for GPT-2's
block and the modern one, fp32 and int8. `generate` falls back to the textbook loop for what the
twin does not cover (a batch of more than one, or text longer than the context).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.gpt.generate import KVCache, check_sampling, sample_next_token
from core.gpt.generate import generate as textbook_generate
from core.gpt.model import GPT, SwiGLU
from core.lab.models import generation_threads

def _kernel(module: nn.Module):
    """The one call a Linear-like `module` makes for a (1, in) row: a function of x."""
    if hasattr(module, "product"):  # quantize.TokenGroupedInt8: one row is one fbgemm product
        return module.product
    if type(module) is nn.Linear:
        weight, bias = module.weight, module.bias
        return lambda x: F.linear(x, weight, bias)
    return module.forward  # PyTorch's dynamic int8, weight-only int8, anything else: its own forward


def _norm(module: nn.Module):
    """A norm module as one functional call of x (1, C)."""
    shape = module.normalized_shape
    if isinstance(module, nn.LayerNorm):  # the textbook's LayerNorm too
        weight, bias, eps = module.weight, module.bias, module.eps
        return lambda x: F.layer_norm(x, shape, weight, bias, eps)
    weight, eps = module.weight, module.eps
    return lambda x: F.rms_norm(x, shape, weight, eps)


class FastDecoder:
    """One new token's logits, as `GPT._last_logits(token, cache)` gives them, with fewer operations."""

    def __init__(self, model: GPT):
        config = model.config
        self.n_head, self.n_kv, self.hs = config.n_head, config.kv_heads, config.head_size
        self.q_size, self.kv_size = self.n_head * self.hs, self.n_kv * self.hs
        self.wte = model.wte.weight
        self.wpe = model.wpe.weight if model.wpe is not None else None
        self.rope = config.position == "rope"
        if self.rope:
            half = self.hs // 2
            # rotate_half(x)·sin = flip_halves(x)·[-sin_first_half, sin_second_half]: (ctx, hs)
            self.cos = model.rope_cos
            self.signed_sin = torch.cat((-model.rope_sin[:, :half], model.rope_sin[:, half:]), dim=-1)
        self.layers = [self._layer(block) for block in model.blocks]
        self.norm_f, self.head = _norm(model.ln_f), _kernel(model.lm_head)

    def _layer(self, block) -> tuple:
        mlp = block.mlp
        if isinstance(mlp, SwiGLU):
            hidden = mlp.proj.in_features
            fc, proj = _kernel(mlp.fc), _kernel(mlp.proj)

            def feed_forward(h):  # (1, C) -> (1, 2·hidden) -> (1, C)
                gate_up = fc(h)
                return proj(F.silu(gate_up[:, :hidden]) * gate_up[:, hidden:])
        else:
            fc, proj, approximate = _kernel(mlp.fc), _kernel(mlp.proj), mlp.gelu.approximate

            def feed_forward(h):
                return proj(F.gelu(fc(h), approximate=approximate))
        return (_norm(block.ln_1), _kernel(block.attn.qkv), _kernel(block.attn.proj),
                _norm(block.ln_2), feed_forward)

    def step(self, token: int, cache: KVCache) -> torch.Tensor:
        """Logits (1, V) after `token`, which sits at position cache.length; the cache grows by one."""
        p, hs, n_head, n_kv = cache.length, self.hs, self.n_head, self.n_kv
        x = self.wte[token].unsqueeze(0)  # (1, C)
        if self.wpe is not None:
            x = x + self.wpe[p]
        if self.rope:
            cos, sin = self.cos[p], self.signed_sin[p]  # (hs,)
        for layer, (norm_1, qkv, proj, norm_2, feed_forward) in enumerate(self.layers):
            mixed = qkv(norm_1(x))  # (1, (H + 2·H_kv)·hs)
            qk = mixed[0, : self.q_size + self.kv_size].view(n_head + n_kv, hs)  # queries, then keys
            if self.rope:
                qk = qk * cos + qk.view(n_head + n_kv, 2, hs // 2).flip(1).view(n_head + n_kv, hs) * sin
            cache.keys[layer][0, :, p] = qk[n_head:]
            cache.values[layer][0, :, p] = mixed[0, self.q_size + self.kv_size:].view(n_kv, hs)
            y = F.scaled_dot_product_attention(
                qk[:n_head].view(1, n_head, 1, hs), cache.keys[layer][:, :, : p + 1],
                cache.values[layer][:, :, : p + 1], enable_gqa=n_kv != n_head)  # (1, H, 1, hs)
            x = x + proj(y.view(1, n_head * hs))
            x = x + feed_forward(norm_2(x))
        cache.length = p + 1
        return self.head(self.norm_f(x))


@torch.inference_mode()
def generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None, decoder: FastDecoder | None = None) -> torch.Tensor:
    """`core.gpt.generate.generate` with the cache, each decoding step through the twin:
    the same tokens (greedy), faster. idx (1, T) -> (1, T + new)."""
    check_sampling(temperature, top_k, top_p)
    ctx = model.config.context_length
    if idx.dim() != 2 or idx.shape[0] != 1 or idx.shape[1] + max_new_tokens > ctx:
        return textbook_generate(model, idx, max_new_tokens, temperature, top_k, top_p, eos_id,
                                 generator=generator)
    model._check_input(idx)
    was_training = model.training
    model.eval()
    decoder = decoder or FastDecoder(model)
    cache = KVCache(model.config, 1, idx.device, model.wte.weight.dtype)
    tokens = idx[0].tolist()
    try:
        with generation_threads(model):
            logits = model._last_logits(idx, cache)  # prefill: the textbook path fills the cache
            for i in range(max_new_tokens):
                next_id = int(sample_next_token(logits, temperature, top_k, top_p, generator))
                tokens.append(next_id)
                if next_id == eos_id or i == max_new_tokens - 1:
                    break
                logits = decoder.step(next_id, cache)
    finally:
        model.train(was_training)
    return torch.tensor([tokens], device=idx.device)
