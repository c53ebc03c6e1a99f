"""Generation: the KV cache, sampling (temperature, top-k, top-p) and the decoding loop.

A language model scores every possible next token; generating text is a loop:
score -> pick one token -> append it -> score again. Two ideas make the loop practical:

- the KV cache (`KVCache`): the keys and values of the tokens already seen never change, so they
  are stored, and each new token costs one position instead of the whole sequence again;
- sampling (`filtered_probabilities`, `sample_next_token`): temperature sharpens or flattens the
  distribution, top-k and top-p cut its long tail of unlikely tokens.

`GPT.generate` and `GPT.next_token_distribution` (core/gpt/model.py) call `generate` and
`next_token_distribution` below with the model itself.
"""

import torch
import torch.nn.functional as F

from core.gpt.errors import ModelConfigError


class KVCache:
    """Keys and values of the tokens seen so far, one pair of buffers per block.

    Buffers are allocated once at full context length and filled in place, so a generation step
    does no copying of the past: it writes one new key/value and reads the filled prefix. With
    grouped-query attention only the n_kv_head key/value heads are stored (that is its point).
    """

    def __init__(self, config, batch_size: int, device, dtype):
        kv_heads = config.n_kv_head or config.n_head
        shape = (batch_size, kv_heads, config.context_length, config.head_size)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layer)]
        self.length = 0  # positions filled (the same for every layer)

    def store(self, layer: int, k, v):
        """Append k, v (B, H_kv, t, hs) for `layer`; return all keys and values so far (B, H_kv, n, hs)."""
        start, end = self.length, self.length + k.shape[2]
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


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


# ---------------------------------------------------------------------------- the loop


def next_logits(model, idx, cache: KVCache | None):
    """Logits (B, V) for the token after `idx`, using and filling the cache while the text fits.

    Past the context length the window slides: positions shift under every cached key, so the
    model recomputes the window each step (exactly as without the cache) and the cache is dropped.
    """
    ctx = model.config.context_length
    if cache is None or idx.shape[1] > ctx:
        return model._last_logits(idx[:, -ctx:], None), None
    if cache.length == 0:  # prefill: the whole prompt at once
        return model._last_logits(idx, cache), cache
    return model._last_logits(idx[:, -1:], cache), cache  # one new token; the rest is cached


@torch.inference_mode()
def generate(model, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, eos_id: int | None = None, use_cache: bool = True,
             generator: torch.Generator | None = None):
    """Continue `idx` (B, T) by up to `max_new_tokens` tokens; returns (B, T + new).

    temperature 0 picks the most likely token (greedy). Stops early once every sequence has
    produced `eos_id` (the EOS token is kept; later tokens of a finished row are EOS too).
    With the cache, greedy output is identical to recomputing everything (a test checks it).
    """
    check_sampling(temperature, top_k, top_p)
    squeeze = idx.dim() == 1
    if squeeze:
        idx = idx.unsqueeze(0)
    model._check_input(idx[:, -model.config.context_length:])
    was_training = model.training
    model.eval()
    cache = KVCache(model.config, idx.shape[0], idx.device, model.wte.weight.dtype) if use_cache else None
    finished = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
    try:
        for _ in range(max_new_tokens):
            logits, cache = next_logits(model, idx, cache)
            next_id = sample_next_token(logits, temperature, top_k, top_p, generator)  # (B, 1)
            if eos_id is not None:
                next_id = torch.where(finished.unsqueeze(1), torch.full_like(next_id, eos_id), next_id)
                finished |= next_id.squeeze(1) == eos_id
            idx = torch.cat((idx, next_id), dim=1)
            if eos_id is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    return idx.squeeze(0) if squeeze else idx


@torch.no_grad()
def next_token_distribution(model, idx, temperature: float = 1.0, top_k: int | None = None,
                            top_p: float | None = None):
    """Probabilities (V,) of the next token after the first sequence of `idx`, after the
    temperature / top-k / top-p filters the sampler would apply (what the page draws as bars)."""
    check_sampling(temperature, top_k, top_p)
    if idx.dim() == 1:
        idx = idx.unsqueeze(0)
    was_training = model.training
    model.eval()
    try:
        logits = model._last_logits(idx[:1, -model.config.context_length:], None)[0]  # (V,)
    finally:
        model.train(was_training)
    return filtered_probabilities(logits, temperature, top_k, top_p)
