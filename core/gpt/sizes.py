"""How big is a GPT? Parameters, memory, FLOPs and KV-cache bytes, by arithmetic on its config.

These functions build no model, so they are instant even for GPT-2 355M; tests check each one
against a real model. Stage 3 puts two configurations side by side with them.

    count_parameters(config)          where the parameters live (the stacked bar)
    flops_per_token(config)           training FLOPs per token (nanoGPT's 6N + attention)
    kv_cache_bytes_per_token(config)  memory the KV cache adds for every token generated
    forward_trace(model, idx)         every module's output shape, parameters and bytes
"""

import torch.nn as nn


def _kv_heads(config) -> int:
    return config.n_kv_head or config.n_head


def _ffn_hidden(config) -> int:
    return config.ffn_hidden or 4 * config.n_embd


def count_parameters(config) -> dict[str, int]:
    """Where the parameters live. Keys are the components of the stacked bar."""
    C, L, V, T = config.n_embd, config.n_layer, config.vocab_size, config.context_length
    hs, bias = config.head_size, int(config.bias)
    qkv_rows = (config.n_head + 2 * _kv_heads(config)) * hs  # queries, then keys and values
    attention = C * qkv_rows + qkv_rows * int(config.qkv_bias) + C * C + C * bias  # qkv + proj
    F = _ffn_hidden(config)
    fc_rows = 2 * F if config.mlp == "swiglu" else F  # SwiGLU's fc holds [gate; up]
    feed_forward = C * fc_rows + fc_rows * bias + F * C + C * bias  # fc (C -> F) + proj (F -> C)
    per_norm = 2 * C if config.norm == "layernorm" and bias else C  # scale (+ shift)
    return {
        "token embedding": V * C,
        "position embedding": T * C if config.position == "learned" else 0,  # RoPE learns nothing
        "attention": L * attention,
        "feed-forward": L * feed_forward,
        "layer norms": (2 * L + 1) * per_norm,  # two per block + the final one
        "output head": 0 if config.tie_weights else V * C,  # tied: shares the token embedding
    }


def memory_bytes(n_parameters: int, bytes_per_value: int = 4) -> int:
    """Bytes to hold the weights (fp32: 4 bytes each). Training needs ~4x this (grads + AdamW state)."""
    return n_parameters * bytes_per_value


def flops_per_token(config, seq_len: int | None = None) -> int:
    """Training FLOPs per token, nanoGPT's estimate: 6N for the weights (forward 2N + backward 4N,
    N without the position table, which is looked up, not multiplied) plus 12·L·H·hs·T for the
    attention scores and the weighted sum. Grouped-query attention does not change the second
    term: every query head still scores every key."""
    parts = count_parameters(config)
    n = sum(parts.values()) - parts["position embedding"]
    if not config.tie_weights:
        n -= parts["token embedding"]  # the untied head is counted; the lookup table is not
    T = seq_len or config.context_length
    return 6 * n + 12 * config.n_layer * config.n_head * config.head_size * T


def kv_cache_bytes_per_token(config, bytes_per_value: int = 4) -> int:
    """Bytes the KV cache stores for each token: a key and a value of n_kv_head heads per block.
    Grouped-query attention (n_kv_head < n_head) divides this by n_head / n_kv_head."""
    return 2 * config.n_layer * _kv_heads(config) * config.head_size * bytes_per_value


def parameter_breakdown(model: nn.Module) -> dict[str, int]:
    """Parameters per component (same keys as `count_parameters`), counted on the real tensors."""
    parts = dict.fromkeys(count_parameters(model.config), 0)
    for name, p in model.named_parameters():  # a tied lm_head.weight is not listed twice
        if name.startswith("wte"):
            parts["token embedding"] += p.numel()
        elif name.startswith("wpe"):
            parts["position embedding"] += p.numel()
        elif ".attn." in name:
            parts["attention"] += p.numel()
        elif ".mlp." in name:
            parts["feed-forward"] += p.numel()
        elif ".ln_" in name or name.startswith("ln_f"):
            parts["layer norms"] += p.numel()
        elif name.startswith("lm_head"):
            parts["output head"] += p.numel()
    return parts


def _trace_row(model, name: str, module: nn.Module) -> dict:
    n_params = sum(p.numel() for p in module.parameters())
    depth = sum(not part.isdigit() for part in name.split(".")) - 1  # blocks.0.attn -> 1
    row = {"module": name, "kind": type(module).__name__, "depth": depth, "output_shape": None,
           "parameters": n_params, "bytes_fp32": memory_bytes(n_params), "note": ""}
    if module is model.lm_head and model.lm_head.weight is model.wte.weight:
        row["note"] = "shares its matrix with wte (tied): no extra memory"
        row["bytes_fp32"] = 0
    return row


def forward_trace(model: nn.Module, idx) -> list[dict]:
    """Every module's output shape in the order the data visits them, with its parameters and
    their fp32 bytes. Parents come before their parts (`depth` says how deep)."""
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    rows, hooks = [], []
    for name, module in model.named_modules():
        if not name or isinstance(module, (nn.ModuleList, nn.Dropout)):
            continue
        row = _trace_row(model, name, module)
        hooks.append(module.register_forward_pre_hook(lambda mod, args, row=row: rows.append(row)))
        hooks.append(module.register_forward_hook(
            lambda mod, args, output, row=row: row.update(output_shape=list(output.shape))))
    try:
        model(idx)
    finally:
        for h in hooks:
            h.remove()
    return rows
