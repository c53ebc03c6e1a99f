"""Stage 3 — the whole GPT: embeddings, transformer blocks, and a head that scores every next token.

Read this file top to bottom and you have read GPT-2, and, one option at a time, a Llama-style model.
The pieces, in the order the data flows:

    token ids (B, T)
      -> token embedding (+ position embedding)         (B, T, C)
      -> n_layer x Block:                               (B, T, C)   = residual_stream(idx)
             x = x + attention(norm(x))                 tokens look at earlier tokens
             x = x + feed_forward(norm(x))              each token thinks on its own
      -> final norm                                     (B, T, C)   = hidden_states(idx)
      -> lm_head (a Linear, tied to the token embedding) (B, T, V)  = one score per vocabulary entry

`B` is the batch, `T` the number of tokens, `C` the embedding size (`n_embd`), `V` the vocabulary.

GPT-2 (2019) or a modern block (Llama, Qwen, SmolLM), switchable per option in `GPTConfig`:
    position  "learned" (a table of position vectors) | "rope" (rotate q and k: core/gpt/rope.py)
    norm      "layernorm" (centre and scale)          | "rmsnorm" (scale only, no mean, no shift)
    mlp       "gelu" (C -> 4C -> C)                   | "swiglu" (a gated feed-forward)
    n_kv_head n_head (multi-head)  | fewer (grouped-query) | 1 (multi-query): fewer keys and values
    bias      True (GPT-2)                            | False (no bias in any Linear, as Llama)

Two ways to compute the same numbers (`GPTConfig.attention`):
- "fast": one fused Q/K/V matrix multiply, PyTorch's `scaled_dot_product_attention` (it never builds
  the T x T matrix in memory), built-in norm and activation kernels. Training uses this.
- "teaching": every step written out as the textbook does — separate Q, K and V projections, the
  from-scratch attention of stage 2 (`core.gpt.attention`, explicit causal mask, softmax you can print),
  the norms and activations from their formulas. Same weights, same results (a test proves it), slower.

The configuration and presets are in core/gpt/config.py; generation, sampling and the KV cache in
core/gpt/generate.py; sizes (parameters, FLOPs, KV-cache bytes) in core/gpt/sizes.py. Parameter names follow GPT-2 so OpenAI's weights load:
`wte`, `wpe`, `blocks.{i}.ln_1`, `blocks.{i}.attn.qkv`, `blocks.{i}.attn.proj`, `blocks.{i}.ln_2`,
`blocks.{i}.mlp.fc`, `blocks.{i}.mlp.proj`, `ln_f`, `lm_head`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.gpt import generate as generation, sizes
from core.gpt.attention import scaled_dot_product_attention  # stage 2's readable version
from core.gpt.config import ATTENTION_PATHS, GELU_KINDS, PRESETS, GPTConfig, preset_config  # noqa: F401
from core.gpt.errors import ModelConfigError
from core.gpt.generate import KVCache, check_sampling, filtered_probabilities, sample_next_token  # noqa: F401
from core.gpt.rope import apply_rope, rope_cos_sin
from core.gpt.sizes import count_parameters, memory_bytes  # noqa: F401  (stage 3 reads them here too)


# ---------------------------------------------------------------------------- building blocks


class LayerNorm(nn.LayerNorm):
    """LayerNorm: centre each vector, scale it to unit size, then a learned scale and shift."""

    teaching = False

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        if not self.teaching:
            return super().forward(x)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        y = (x - mean) / torch.sqrt(var + self.eps) * self.weight
        return y + self.bias if self.bias is not None else y


class RMSNorm(nn.RMSNorm):
    """RMSNorm: divide by the root mean square only (no centring, no shift), then a learned scale.
    Cheaper than LayerNorm and, in practice, as good: Llama and most models since use it."""

    teaching = False

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        if not self.teaching:
            return super().forward(x)
        return x / torch.sqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight


def make_norm(config: GPTConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.n_embd, eps=config.norm_eps)
    return LayerNorm(config.n_embd, eps=config.norm_eps, bias=config.bias)


class GELU(nn.GELU):
    """GELU(x) = x·Φ(x): exact (erf) or GPT-2's tanh approximation; the teaching path writes out the formula."""

    teaching = False

    def __init__(self, kind: str = "exact"):
        super().__init__(approximate="tanh" if kind == "tanh" else "none")

    def forward(self, x):
        if not self.teaching:
            return super().forward(x)
        if self.approximate == "tanh":
            return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def repeat_kv(x, n_rep: int):
    """Grouped-query attention: key/value head j serves query heads j·n_rep .. j·n_rep + n_rep - 1.
    (B, H_kv, T, hs) -> (B, H_kv · n_rep, T, hs)."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class CausalSelfAttention(nn.Module):
    """Multi-head attention where each token may only look at itself and earlier tokens."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_size = config.n_head, config.kv_heads, config.head_size
        self.layer, self.dropout, self.rope_base = layer, config.dropout, config.rope_base
        self.rope = config.position == "rope"
        # Q, K and V for all heads in one matrix: rows [q (H·hs); k (H_kv·hs); v (H_kv·hs)].
        self.sizes = [self.n_head * self.head_size] + 2 * [self.n_kv_head * self.head_size]
        self.qkv = nn.Linear(config.n_embd, sum(self.sizes), bias=config.qkv_bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)  # mixes the heads back
        self.resid_dropout = nn.Dropout(config.dropout)
        self.teaching = False
        self.keep_weights = False  # attention_maps() sets this to record the (B, H, T, T) weights
        self.last_weights = None

    def project(self, x):
        """Queries (B, H, T, hs), keys and values (B, H_kv, T, hs) from x (B, T, C)."""
        B, T, _ = x.shape
        if self.teaching:
            # The three projections the textbook writes as separate layers are rows of one matrix.
            weights = self.qkv.weight.split(self.sizes, dim=0)
            biases = self.qkv.bias.split(self.sizes) if self.qkv.bias is not None else (None,) * 3
            q, k, v = (F.linear(x, w, b) for w, b in zip(weights, biases))
        else:
            q, k, v = self.qkv(x).split(self.sizes, dim=2)
        # Split into heads, heads first: (B, T, heads·hs) -> (B, heads, T, hs).
        q = q.view(B, T, self.n_head, self.head_size).transpose(1, 2)
        k = k.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)
        v = v.view(B, T, self.n_kv_head, self.head_size).transpose(1, 2)
        return q, k, v

    def forward(self, x, cache: KVCache | None = None, rope=None):
        B, T, C = x.shape
        q, k, v = self.project(x)
        if self.rope:  # rotate queries and keys by their positions (cached keys are already rotated)
            start = cache.length if cache is not None else 0
            cos, sin = rope if rope is not None else rope_cos_sin(T, self.head_size, self.rope_base,
                                                                  start, x.device)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            if T > 1 and cache.length:
                raise ModelConfigError("The KV cache takes a prompt once, then one token at a time.")
            k, v = cache.store(self.layer, k, v)  # (B, H_kv, n, hs), n = tokens so far
        # One new token attends to everything cached (all of it is in the past): no mask needed.
        causal, dropout_p = T > 1, (self.dropout if self.training else 0.0)
        if self.teaching or self.keep_weights:
            n_rep = self.n_head // self.n_kv_head
            y, weights = scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep),
                                                      causal=causal, dropout_p=dropout_p,
                                                      training=self.training)
            self.last_weights = weights.detach() if self.keep_weights else None
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                               enable_gqa=self.n_kv_head != self.n_head)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """Per token: widen to 4C, GELU, back to C. Most of a block's parameters live here."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, config.hidden_size, bias=config.bias)
        self.gelu = GELU(config.gelu)
        self.proj = nn.Linear(config.hidden_size, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class SwiGLU(nn.Module):
    """A gated feed-forward: y = proj(silu(gate) * up). The gate decides, per inner unit, how much
    of `up` passes; silu(g) = g·sigmoid(g). `fc` holds [gate; up] stacked: C -> 2·hidden."""

    teaching = False

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 2 * config.hidden_size, bias=config.bias)
        self.proj = nn.Linear(config.hidden_size, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, C) -> 2 x (B, T, hidden) -> (B, T, C)
        gate, up = self.fc(x).chunk(2, dim=-1)
        gated = gate * torch.sigmoid(gate) if self.teaching else F.silu(gate)
        return self.dropout(self.proj(gated * up))


class Block(nn.Module):
    """One transformer block, pre-norm as in GPT-2: normalise, transform, add back (residual)."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = make_norm(config)
        self.mlp = SwiGLU(config) if config.mlp == "swiglu" else FeedForward(config)

    def forward(self, x, cache: KVCache | None = None, rope=None):  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln_1(x), cache, rope)  # the residual stream carries x past each sub-layer
        x = x + self.mlp(self.ln_2(x))
        return x


# ---------------------------------------------------------------------------- the model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token id -> vector
        self.wpe = nn.Embedding(config.context_length, config.n_embd) if config.position == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = make_norm(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_weights:
            # The same matrix reads tokens in and scores them out (GPT-2 does this; saves V*C params).
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        # GPT-2: scale the layers that write into the residual stream by 1/sqrt(2 * n_layer), so the
        # sum over 2 * n_layer residual branches keeps its size at initialisation.
        for name, p in self.named_parameters():
            if name.endswith("attn.proj.weight") or name.endswith("mlp.proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.position == "rope":  # every position's rotation, computed once (not saved)
            cos, sin = rope_cos_sin(config.context_length, config.head_size, config.rope_base)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self._path = None
        self.set_attention(config.attention)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_attention(self, path: str) -> "GPT":
        """Switch between the "fast" and the "teaching" computation (same weights, same numbers)."""
        if path not in ATTENTION_PATHS:
            raise ModelConfigError(f"attention must be 'fast' or 'teaching' (got {path!r}).")
        self.config.attention = path
        for module in self.modules():
            if isinstance(module, (LayerNorm, RMSNorm, GELU, SwiGLU, CausalSelfAttention)):
                module.teaching = path == "teaching"
        self._path = path
        return self

    # -- forward ------------------------------------------------------------------------------

    def _check_input(self, idx, start: int = 0):
        """Clear errors for input the model cannot read. Cached decoding steps (start > 0) skip the
        vocabulary check: their tokens come from the model's own scores, and it costs a sync per token."""
        if not torch.is_tensor(idx) or idx.dim() != 2:
            raise ModelConfigError("The model takes token ids shaped (batch, tokens).")
        T = idx.shape[1]
        if T == 0:
            raise ModelConfigError("The input is empty: give the model at least one token.")
        if start + T > self.config.context_length:
            raise ModelConfigError(
                f"The input has {start + T} tokens but the model's context length is {self.config.context_length}: "
                f"it has no position {self.config.context_length}. Shorten the input."
            )
        if idx.device.type == "meta" or start:  # meta: shapes only (inspect traces big models without weights)
            return
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ModelConfigError(
                f"Token id {bad} is outside the model's vocabulary (0–{self.config.vocab_size - 1}): "
                "was the text encoded with a different tokenizer?"
            )

    def _embed(self, idx, start: int = 0):
        """Token vectors (plus position vectors when positions are learned): (B, T) -> (B, T, C)."""
        if self._path != self.config.attention:  # someone changed config.attention directly
            self.set_attention(self.config.attention)
        x = self.wte(idx)
        if self.wpe is not None:
            pos = torch.arange(start, start + idx.shape[1], dtype=torch.long, device=idx.device)  # (T,)
            x = x + self.wpe(pos)  # (B, T, C) + (T, C) broadcasts over B
        return self.drop(x)

    def _rope(self, start: int, T: int):
        """The (cos, sin) rows of positions start .. start + T - 1, or None without RoPE."""
        if self.config.position != "rope":
            return None
        return self.rope_cos[start:start + T], self.rope_sin[start:start + T]

    def residual_stream(self, idx) -> list:
        """The residual stream (B, T, C) after the embeddings and after each block: n_layer + 1 tensors."""
        self._check_input(idx)
        x = self._embed(idx)
        stream, rope = [x], self._rope(0, idx.shape[1])
        for block in self.blocks:
            x = block(x, None, rope)
            stream.append(x)
        return stream

    def hidden_states(self, idx, cache: KVCache | None = None):
        """The final norm's output: one C-vector per token, (B, T, C). With a cache, idx holds the
        new tokens only (the prompt once, then one at a time) and the cache grows by them."""
        start = cache.length if cache is not None else 0
        self._check_input(idx, start)
        x, rope = self._embed(idx, start), self._rope(start, idx.shape[1])
        for block in self.blocks:
            x = block(x, cache, rope)
        if cache is not None:
            cache.length += idx.shape[1]
        return self.ln_f(x)

    def forward(self, idx, targets=None, ignore_index: int = -100, cache: KVCache | None = None):
        """Logits (B, T, V) for every position; with targets (B, T), also the mean cross-entropy loss."""
        logits = self.lm_head(self.hidden_states(idx, cache))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=ignore_index)
        return logits, loss

    def _last_logits(self, idx, cache: KVCache | None):
        """Logits (B, V) of the last position. The output layer runs on that position only."""
        return self.lm_head(self.hidden_states(idx, cache)[:, -1, :])

    @torch.no_grad()
    def attention_maps(self, idx):
        """Attention weights of every layer and head for the first sequence: (L, H, T, T)."""
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        attns = [block.attn for block in self.blocks]
        for attn in attns:
            attn.keep_weights = True
        try:
            self.hidden_states(idx[:1])
            return torch.stack([attn.last_weights[0] for attn in attns])
        finally:
            for attn in attns:
                attn.keep_weights, attn.last_weights = False, None

    # -- generation (core/gpt/generate.py) and sizes (core/gpt/sizes.py) ----------------------

    def generate(self, idx, max_new_tokens: int, **sampling):
        """Continue idx (B, T) by up to max_new_tokens tokens: see core.gpt.generate.generate."""
        return generation.generate(self, idx, max_new_tokens, **sampling)

    def next_token_distribution(self, idx, **sampling):
        """Probabilities (V,) of the next token: see core.gpt.generate.next_token_distribution."""
        return generation.next_token_distribution(self, idx, **sampling)

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters (a tied matrix counted once). `non_embedding=True` leaves out the embedding
        tables that are only looked up, never multiplied (as nanoGPT does for its FLOP count)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel() if self.wpe is not None else 0
            if self.lm_head.weight is not self.wte.weight:
                n -= self.wte.weight.numel()
        return n

    def parameter_breakdown(self) -> dict[str, int]:
        return sizes.parameter_breakdown(self)

    def flops_per_token(self, seq_len: int | None = None) -> int:
        return sizes.flops_per_token(self.config, seq_len)

    def forward_trace(self, idx) -> list[dict]:
        return sizes.forward_trace(self, idx)
