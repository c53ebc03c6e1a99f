"""Stage 3 — the whole GPT: embeddings, transformer blocks, and a head that scores every next token.

Read this file top to bottom and you have read GPT-2. The pieces, in the order the data flows:

    token ids (B, T)
      -> token embedding + position embedding          (B, T, C)
      -> n_layer x Block:                               (B, T, C)
             x = x + attention(LayerNorm(x))            tokens look at earlier tokens
             x = x + feed_forward(LayerNorm(x))         each token thinks on its own
      -> final LayerNorm                                (B, T, C)   = hidden_states(idx)
      -> lm_head (a Linear, tied to the token embedding) (B, T, V)  = one score per vocabulary entry

`B` is the batch, `T` the number of tokens, `C` the embedding size (`n_embd`), `V` the vocabulary.

Two ways to compute the same numbers (`GPTConfig.attention`):
- "fast": one fused Q/K/V matrix multiply, PyTorch's `scaled_dot_product_attention` (it never builds
  the T x T matrix in memory), built-in LayerNorm and GELU kernels. Training uses this.
- "teaching": every step written out as the textbook does — separate Q, K and V projections, the
  from-scratch attention of stage 2 (`core.gpt.attention`, explicit causal mask, softmax you can print),
  LayerNorm and GELU from their formulas. Same weights, same results (a test proves it), slower.

Generation (`GPT.generate`) keeps a KV cache: the keys and values of tokens already seen are
stored, so each new token costs one position instead of the whole sequence again.

Parameter names follow GPT-2 closely so `core/gpt2.py` can load OpenAI's weights:
`wte`, `wpe`, `blocks.{i}.ln_1`, `blocks.{i}.attn.qkv`, `blocks.{i}.attn.proj`, `blocks.{i}.ln_2`,
`blocks.{i}.mlp.fc`, `blocks.{i}.mlp.proj`, `ln_f`, `lm_head`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.gpt.errors import ModelConfigError

ATTENTION_PATHS = ("fast", "teaching")
# GELU(x) = x·Φ(x), Φ the normal distribution's CDF. GPT-2 used the GELU paper's tanh approximation
# of Φ; on this CPU PyTorch's exact (erf) kernel is the fast one: measured on a (32, 64, 512) tensor,
# forward + backward 0.75 ms exact vs 2.3 ms tanh (~10% of a training step of the 3 x 128 model
# measured then). Models trained here use "exact"; GPT-2's weights were trained with, and keep, "tanh".
GELU_KINDS = ("exact", "tanh")


# ---------------------------------------------------------------------------- configuration


@dataclass
class GPTConfig:
    vocab_size: int
    context_length: int  # how many positions the position table holds (GPT-2: 1024)
    n_embd: int  # C, the width of every token's vector
    n_head: int  # attention heads per block; each head works on n_embd // n_head numbers
    n_layer: int  # transformer blocks
    dropout: float = 0.0
    qkv_bias: bool = False  # GPT-2 has a bias on Q/K/V; modern models usually drop it
    tie_weights: bool = True  # lm_head shares its matrix with the token embedding (GPT-2 does)
    attention: str = "fast"  # "fast" or "teaching" (see the module docstring)
    gelu: str = "exact"  # "exact" (erf) or "tanh" (GPT-2's approximation); see GELU_KINDS

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        for name in ("vocab_size", "context_length", "n_embd", "n_head", "n_layer"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ModelConfigError(f"{name} must be a whole number, got {value!r}.")
        if self.vocab_size < 1:
            raise ModelConfigError(f"The vocabulary needs at least one token (vocab_size={self.vocab_size}).")
        if self.context_length < 1:
            raise ModelConfigError(f"context_length must be at least 1 (got {self.context_length}).")
        if self.n_layer < 1:
            raise ModelConfigError(f"A GPT needs at least one transformer block (n_layer={self.n_layer}).")
        if self.n_head < 1:
            raise ModelConfigError(f"Attention needs at least one head (n_head={self.n_head}).")
        if self.n_embd < 1:
            raise ModelConfigError(f"n_embd must be at least 1 (got {self.n_embd}).")
        if self.n_embd % self.n_head:
            raise ModelConfigError(
                f"The embedding size ({self.n_embd}) must divide evenly among the {self.n_head} heads: "
                f"each head gets n_embd / n_head numbers. Try n_embd = {self.n_head * max(1, round(self.n_embd / self.n_head))}."
            )
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ModelConfigError(f"dropout must be between 0 and 1 (got {self.dropout}).")
        if self.attention not in ATTENTION_PATHS:
            raise ModelConfigError(f"attention must be 'fast' or 'teaching' (got {self.attention!r}).")
        if self.gelu not in GELU_KINDS:
            raise ModelConfigError(f"gelu must be 'exact' or 'tanh' (got {self.gelu!r}).")

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        if not isinstance(d, dict):
            raise ModelConfigError(f"A model config must be a JSON object, got {type(d).__name__}.")
        known = {f.name for f in fields(cls)}
        missing = [n for n in ("vocab_size", "context_length", "n_embd", "n_head", "n_layer") if n not in d]
        if missing:
            raise ModelConfigError(f"The model config lacks {', '.join(missing)}.")
        values = {k: v for k, v in d.items() if k in known}
        values.setdefault("gelu", "tanh")  # runs saved before the choice existed all used GPT-2's tanh GELU
        return cls(**values)


# The recipes. Stage 4 tunes `small` and `base`; `vocab_size` comes from the tokenizer.
PRESETS: dict[str, dict] = {
    # trains in seconds on a laptop CPU: enough to watch a loss fall
    "tiny": dict(context_length=64, n_embd=64, n_head=4, n_layer=2, dropout=0.0),
    # val loss ≤ 1.88 on Tiny Shakespeare characters in about half a minute on 2 CPU cores with the
    # recipe in core/gpt/pretrain.py. Wide and shallow on purpose: a CPU multiplies wide matrices
    # more efficiently (MFU 0.63-0.65 vs 0.53-0.55 for 3 blocks x 128, nanoGPT's shape minus a block),
    # and 2 x 192 learns as much per second (see the recipe's notes)
    "small": dict(context_length=64, n_embd=192, n_head=6, n_layer=2, dropout=0.0),
    # longer context for BPE tokens; the starting point of stages 5 and 6
    "base": dict(context_length=256, n_embd=128, n_head=4, n_layer=4, dropout=0.0),
    # OpenAI's GPT-2 shapes (load their weights with core/gpt2.py)
    "gpt2-124m": dict(context_length=1024, n_embd=768, n_head=12, n_layer=12, dropout=0.0,
                      qkv_bias=True, vocab_size=50257, gelu="tanh"),
    "gpt2-355m": dict(context_length=1024, n_embd=1024, n_head=16, n_layer=24, dropout=0.0,
                      qkv_bias=True, vocab_size=50257, gelu="tanh"),
}


def preset_config(name: str, vocab_size: int | None = None, **overrides) -> GPTConfig:
    """The GPTConfig of a preset; `vocab_size` comes from the tokenizer (GPT-2 presets default to 50257)."""
    if name not in PRESETS:
        raise ModelConfigError(f"Unknown preset {name!r}; presets are {', '.join(PRESETS)}.")
    values = dict(PRESETS[name])
    if vocab_size is not None:
        values["vocab_size"] = vocab_size
    if "vocab_size" not in values:
        raise ModelConfigError(f"Preset {name!r} needs a vocabulary size (from the tokenizer).")
    values.update(overrides)
    return GPTConfig(**values)


def count_parameters(config: GPTConfig) -> dict[str, int]:
    """Where the parameters live, by arithmetic alone (no model is built: instant even for 355M).

    A test checks these numbers against a real model. Keys are the components of the stacked bar.
    """
    C, L, V, T = config.n_embd, config.n_layer, config.vocab_size, config.context_length
    attention = L * ((C * 3 * C + (3 * C if config.qkv_bias else 0)) + (C * C + C))  # qkv + proj
    feed_forward = L * ((C * 4 * C + 4 * C) + (4 * C * C + C))  # fc (C -> 4C) + proj (4C -> C)
    layer_norms = L * 2 * (2 * C) + 2 * C  # two per block + the final one, each a scale and a shift
    return {
        "token embedding": V * C,
        "position embedding": T * C,
        "attention": attention,
        "feed-forward": feed_forward,
        "layer norms": layer_norms,
        "output head": 0 if config.tie_weights else V * C,  # tied: shares the token embedding
    }


def memory_bytes(n_parameters: int, bytes_per_value: int = 4) -> int:
    """Bytes to hold the weights (fp32: 4 bytes each). Training needs ~4x this (grads + AdamW state)."""
    return n_parameters * bytes_per_value


# ---------------------------------------------------------------------------- building blocks


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm; on the teaching path its formula is written out (same parameters, same result)."""

    teaching = False

    def forward(self, x):  # (B, T, C) -> (B, T, C)
        if not self.teaching:
            return super().forward(x)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


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


class KVCache:
    """Keys and values of the tokens seen so far, one pair of buffers per block.

    Buffers are allocated once at full context length and filled in place, so a generation step
    does no copying of the past: it writes one new key/value and reads the filled prefix.
    """

    def __init__(self, config: GPTConfig, batch_size: int, device, dtype):
        shape = (batch_size, config.n_head, config.context_length, config.head_size)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions filled (the same for every layer)

    def store(self, layer: int, k, v):
        """Append k, v (B, H, t, hs) for `layer`; return all keys and values so far (B, H, n, hs)."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class CausalSelfAttention(nn.Module):
    """Multi-head attention where each token may only look at itself and earlier tokens."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.n_head, self.n_embd, self.layer = config.n_head, config.n_embd, layer
        self.dropout = config.dropout
        # Q, K and V for all heads in one matrix multiply: (C) -> (3C).
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.qkv_bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd)  # mixes the heads back together
        self.resid_dropout = nn.Dropout(config.dropout)
        self.teaching = False
        self.keep_weights = False  # attention_maps() sets this to record the (B, H, T, T) weights
        self.last_weights = None

    def forward(self, x, cache: KVCache | None = None):
        B, T, C = x.shape
        H, hs = self.n_head, C // self.n_head
        if self.teaching:
            # The three projections the textbook writes as separate layers are rows of one matrix.
            w_q, w_k, w_v = self.qkv.weight.split(C, dim=0)
            b_q, b_k, b_v = self.qkv.bias.split(C) if self.qkv.bias is not None else (None, None, None)
            q, k, v = F.linear(x, w_q, b_q), F.linear(x, w_k, b_k), F.linear(x, w_v, b_v)
        else:
            q, k, v = self.qkv(x).split(C, dim=2)  # each (B, T, C)
        # Split C into H heads of size hs, heads first: (B, T, C) -> (B, H, T, hs).
        q = q.view(B, T, H, hs).transpose(1, 2)
        k = k.view(B, T, H, hs).transpose(1, 2)
        v = v.view(B, T, H, hs).transpose(1, 2)
        if cache is not None:
            if T > 1 and cache.length:
                raise ModelConfigError("The KV cache takes a prompt once, then one token at a time.")
            k, v = cache.store(self.layer, k, v)  # (B, H, n, hs), n = tokens so far
        # One new token attends to everything cached (all of it is in the past): no mask needed.
        causal = T > 1
        dropout_p = self.dropout if self.training else 0.0
        if self.teaching or self.keep_weights:
            from core.gpt.attention import scaled_dot_product_attention  # stage 2's readable version

            y, weights = scaled_dot_product_attention(q, k, v, causal=causal, dropout_p=dropout_p,
                                                      training=self.training)
            self.last_weights = weights.detach() if self.keep_weights else None
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # heads side by side again: (B, T, C)
        return self.resid_dropout(self.proj(y))


class FeedForward(nn.Module):
    """Per token: widen to 4C, GELU, back to C. Most of a block's parameters live here."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = GELU(config.gelu)
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):  # (B, T, C) -> (B, T, 4C) -> (B, T, C)
        return self.dropout(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    """One transformer block, pre-LayerNorm as in GPT-2: normalise, transform, add back (residual)."""

    def __init__(self, config: GPTConfig, layer: int):
        super().__init__()
        self.ln_1 = LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, layer)
        self.ln_2 = LayerNorm(config.n_embd)
        self.mlp = FeedForward(config)

    def forward(self, x, cache: KVCache | None = None):  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln_1(x), cache)  # the residual stream carries x past each sub-layer
        x = x + self.mlp(self.ln_2(x))
        return x


# ---------------------------------------------------------------------------- the model


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)  # token id -> vector
        self.wpe = nn.Embedding(config.context_length, config.n_embd)  # position -> vector
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.ln_f = LayerNorm(config.n_embd)
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
            if isinstance(module, (LayerNorm, GELU, CausalSelfAttention)):
                module.teaching = path == "teaching"
        self._path = path
        return self

    # -- forward ------------------------------------------------------------------------------

    def _check_input(self, idx):
        if not torch.is_tensor(idx) or idx.dim() != 2:
            raise ModelConfigError("The model takes token ids shaped (batch, tokens).")
        T = idx.shape[1]
        if T == 0:
            raise ModelConfigError("The input is empty: give the model at least one token.")
        if T > self.config.context_length:
            raise ModelConfigError(
                f"The input has {T} tokens but the model's context length is {self.config.context_length}: "
                f"its position table has no row for position {self.config.context_length}. Shorten the input."
            )
        if idx.device.type == "meta":  # shapes only (inspect traces big models without weights)
            return
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ModelConfigError(
                f"Token id {bad} is outside the model's vocabulary (0–{self.config.vocab_size - 1}): "
                "was the text encoded with a different tokenizer?"
            )

    def _embed(self, idx, start: int = 0):
        """Token vectors plus position vectors: (B, T) -> (B, T, C)."""
        if self._path != self.config.attention:  # someone changed config.attention directly
            self.set_attention(self.config.attention)
        T = idx.shape[1]
        pos = torch.arange(start, start + T, dtype=torch.long, device=idx.device)  # (T,)
        return self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C) + (T, C) broadcasts over B

    def hidden_states(self, idx):
        """The final LayerNorm's output: one C-vector per token, (B, T, C)."""
        self._check_input(idx)
        x = self._embed(idx)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def forward(self, idx, targets=None, ignore_index: int = -100):
        """Logits (B, T, V) for every position; with targets (B, T), also the mean cross-entropy loss."""
        logits = self.lm_head(self.hidden_states(idx))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1),
                                   ignore_index=ignore_index)
        return logits, loss

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

    # -- counting -----------------------------------------------------------------------------

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameters (a tied matrix counted once). `non_embedding=True` leaves out the embedding
        tables that are only looked up, never multiplied (as nanoGPT does for its FLOP count)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel()
            if self.lm_head.weight is not self.wte.weight:
                n -= self.wte.weight.numel()
        return n

    def parameter_breakdown(self) -> dict[str, int]:
        """Parameters per component (same keys as `count_parameters`), counted on the real tensors."""
        parts = {"token embedding": self.wte.weight.numel(), "position embedding": self.wpe.weight.numel(),
                 "attention": 0, "feed-forward": 0, "layer norms": 0, "output head": 0}
        for name, p in self.named_parameters():  # a tied lm_head.weight is not listed twice
            if ".attn." in name:
                parts["attention"] += p.numel()
            elif ".mlp." in name:
                parts["feed-forward"] += p.numel()
            elif ".ln_" in name or name.startswith("ln_f"):
                parts["layer norms"] += p.numel()
            elif name.startswith("lm_head"):
                parts["output head"] += p.numel()
        return parts

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token, nanoGPT's estimate: 6N for the weights (forward 2N + backward
        4N) plus 12·L·H·Q·T for attention scores and the weighted sum (Q = head size, T = context)."""
        cfg = self.config
        T = seq_len or cfg.context_length
        return 6 * self.num_parameters(non_embedding=True) + 12 * cfg.n_layer * cfg.n_head * cfg.head_size * T

    @torch.no_grad()
    def forward_trace(self, idx) -> list[dict]:
        """Every module's output shape in the order the data visits them, with its parameters and
        their fp32 bytes. Parents come before their parts (`depth` says how deep)."""
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        rows, hooks = [], []
        for name, module in self.named_modules():
            if not name or isinstance(module, (nn.ModuleList, nn.Dropout)):
                continue
            n_params = sum(p.numel() for p in module.parameters())
            depth = sum(not part.isdigit() for part in name.split(".")) - 1  # blocks.0.attn -> 1
            row = {"module": name, "kind": type(module).__name__, "depth": depth, "output_shape": None,
                   "parameters": n_params, "bytes_fp32": memory_bytes(n_params), "note": ""}
            if module is self.lm_head and self.lm_head.weight is self.wte.weight:
                row["note"] = "shares its matrix with wte (tied): no extra memory"
                row["bytes_fp32"] = 0

            def pre_hook(mod, args, row=row):
                rows.append(row)

            def post_hook(mod, args, output, row=row):
                row["output_shape"] = list(output.shape)

            hooks.append(module.register_forward_pre_hook(pre_hook))
            hooks.append(module.register_forward_hook(post_hook))
        try:
            self(idx)
        finally:
            for h in hooks:
                h.remove()
        return rows

    # -- generation ---------------------------------------------------------------------------

    def _last_logits(self, idx, cache: KVCache | None):
        """Logits (B, V) of the last position. The output layer runs on that position only."""
        if cache is None:
            x = self.hidden_states(idx)
        else:
            x = self._embed(idx, start=cache.length)
            for block in self.blocks:
                x = block(x, cache)
            cache.length += idx.shape[1]
            x = self.ln_f(x)
        return self.lm_head(x[:, -1, :])

    @torch.inference_mode()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None):
        """Continue `idx` (B, T) by up to `max_new_tokens` tokens; returns (B, T + new).

        temperature 0 picks the most likely token (greedy). Stops early once every sequence has
        produced `eos_id` (the EOS token is kept; later tokens of a finished row are EOS too).
        With the cache, greedy output is identical to recomputing everything (a test checks it).
        Past the context length the window slides; learned positions then shift under every
        cached key, so the model recomputes the window each step (exactly as without the cache).
        """
        check_sampling(temperature, top_k, top_p)
        squeeze = idx.dim() == 1
        if squeeze:
            idx = idx.unsqueeze(0)
        self._check_input(idx[:, -self.config.context_length:])
        was_training = self.training
        self.eval()
        ctx = self.config.context_length
        cache = None
        finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        try:
            for _ in range(max_new_tokens):
                if use_cache and idx.shape[1] <= ctx:
                    if cache is None:  # prefill: the whole prompt at once
                        cache = KVCache(self.config, idx.shape[0], idx.device, self.wte.weight.dtype)
                        logits = self._last_logits(idx, cache)
                    else:  # one new token, everything else comes from the cache
                        logits = self._last_logits(idx[:, -1:], cache)
                else:
                    logits = self._last_logits(idx[:, -ctx:], None)
                next_id = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
                if eos_id is not None:
                    next_id = torch.where(finished.unsqueeze(1), torch.full_like(next_id, eos_id), next_id)
                    finished |= next_id.squeeze(1) == eos_id
                idx = torch.cat((idx, next_id), dim=1)
                if eos_id is not None and bool(finished.all()):
                    break
        finally:
            self.train(was_training)
        return idx.squeeze(0) if squeeze else idx

    @torch.no_grad()
    def next_token_distribution(self, idx, temperature: float = 1.0, top_k: int | None = None,
                                top_p: float | None = None):
        """Probabilities (V,) of the next token after the first sequence of `idx`, after the
        temperature / top-k / top-p filters the sampler would apply (what the page draws as bars)."""
        check_sampling(temperature, top_k, top_p)
        if idx.dim() == 1:
            idx = idx.unsqueeze(0)
        was_training = self.training
        self.eval()
        try:
            logits = self._last_logits(idx[:1, -self.config.context_length:], None)[0]  # (V,)
        finally:
            self.train(was_training)
        return filtered_probabilities(logits, temperature, top_k, top_p)


# ---------------------------------------------------------------------------- sampling


def check_sampling(temperature, top_k, top_p) -> None:
    if temperature is None or temperature < 0:
        raise ModelConfigError(f"Temperature must be 0 (greedy) or more, got {temperature}.")
    if top_k is not None and top_k < 1:
        raise ModelConfigError(f"top-k must be at least 1, got {top_k}.")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ModelConfigError(f"top-p must be in (0, 1], got {top_p}.")


def filtered_probabilities(logits, temperature=1.0, top_k=None, top_p=None):
    """Turn logits (..., V) into the probabilities the sampler draws from.

    temperature < 1 sharpens, > 1 flattens, 0 puts all mass on the top token. top-k keeps the k
    most likely tokens; top-p keeps the smallest set whose probabilities add up to p.
    """
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # the k-th largest score
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked before it already reach top_p (the first always stays).
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return F.softmax(logits, dim=-1)


def sample_next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token id per row of logits (B, V) -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filtered_probabilities(logits, temperature, top_k, top_p)
    return torch.multinomial(probs, num_samples=1, generator=generator)
