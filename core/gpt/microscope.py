"""The microscope: watch a GPT decide, token by token and layer by layer.

Training shows what comes out of a model (a loss, a sample). These functions show it deciding,
for any model on disk, in four views:

1. Generation one token at a time. At every step the next token's probabilities three ways: the
   raw softmax of the scores, after temperature, and after top-k / top-p truncation (the set the
   sampler draws from). The entropy says how sure the model is, the rank where the chosen token
   stood. A learner may force any token instead of sampling one: a branch.
2. Per-token loss ("surprise"): how many nats each real next token cost the model.
3. Logit lens: every layer's residual stream read out through the final norm and the output head,
   so you can see at which depth the right next token appears.
4. The KV cache, made visible: which tokens' keys and values are stored, and what that costs.

Every function takes a `GPT` (core.gpt.model) and plain lists of token ids; nothing here knows
about tokenisers' files, runs on disk or pages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.gpt.errors import GlassBoxError
from core.gpt.generate import KVCache, check_sampling, filtered_probabilities, next_logits
from core.gpt.model import GPT


class MicroscopeError(GlassBoxError):
    """The microscope cannot look at this input (empty, too short, or not a language model)."""


# ---------------------------------------------------------------------------- 1. one step, three ways


def three_distributions(logits, temperature: float = 1.0, top_k: int | None = None,
                        top_p: float | None = None):
    """The next token's probabilities (V,) three ways; each sums to 1.

    raw:         softmax(logits), the model's own opinion;
    temperature: softmax(logits / T); T < 1 sharpens, T > 1 flattens, T = 0 means greedy (all
                 the mass on the top token);
    kept:        then only the top-k tokens, then only the smallest set whose mass reaches top-p,
                 renormalised: exactly what the sampler draws from.
    """
    check_sampling(temperature, top_k, top_p)
    raw = F.softmax(logits.float(), dim=-1)
    tempered = filtered_probabilities(logits.float(), temperature)
    kept = filtered_probabilities(logits.float(), temperature, top_k, top_p)
    return raw, tempered, kept


def entropy_bits(probs) -> float:
    """H = -Σ p·log2(p): 0 bits when one token is certain, log2(V) when all are equally likely."""
    p = probs[probs > 0]
    return float(-(p * p.log2()).sum())


def rank_of(probs, token_id: int) -> int:
    """1 for the model's favourite; n when n - 1 tokens had a higher probability."""
    return int((probs > probs[token_id]).sum()) + 1


@dataclass
class Step:
    """One generation step: the distributions the model gave and the token that was taken."""

    position: int  # where the new token goes in the sequence (0-based)
    token_id: int
    forced: bool  # True when the learner chose it instead of the sampler
    raw: torch.Tensor  # (V,) softmax of the scores
    tempered: torch.Tensor  # (V,) after temperature
    kept: torch.Tensor  # (V,) after top-k / top-p: the sampler's distribution

    @property
    def rank(self) -> int:
        return rank_of(self.raw, self.token_id)

    @property
    def entropy(self) -> float:
        return entropy_bits(self.raw)

    def top(self, n: int = 10) -> list[dict]:
        """The n tokens the model liked best, with their probability in each distribution."""
        p, ids = torch.topk(self.raw, min(n, self.raw.numel()))
        return [{"id": int(i), "p_raw": float(p_), "p_temperature": float(self.tempered[i]),
                 "p_kept": float(self.kept[i])} for p_, i in zip(p, ids)]


def choose_token(kept, temperature: float, generator: torch.Generator | None = None) -> int:
    """Sample from the kept distribution; temperature 0 takes the top token (greedy)."""
    if temperature == 0:
        return int(kept.argmax())
    return int(torch.multinomial(kept, 1, generator=generator))


# ---------------------------------------------------------------------------- 4. the KV cache


def kv_cache_bytes(cache: KVCache) -> int:
    """Bytes of keys and values actually stored: 2 × layers × heads × tokens × head size × 4 (fp32)."""
    n = cache.length
    return sum(k[:, :, :n].nbytes + v[:, :, :n].nbytes for k, v in zip(cache.keys, cache.values))


def kv_cache_layout(cache: KVCache) -> list[dict]:
    """What each layer's cache holds: the shape (batch, heads, tokens, head size) of its keys."""
    n = cache.length
    return [{"layer": layer, "keys": list(k[:, :, :n].shape), "values": list(v[:, :, :n].shape),
             "bytes": k[:, :, :n].nbytes + v[:, :, :n].nbytes}
            for layer, (k, v) in enumerate(zip(cache.keys, cache.values))]


def forced_logits(model: GPT, prompt_ids: list[int], forced: list[int], cache: KVCache | None = None):
    """Scores (len(forced), V) of every forced step from ONE pass over the prompt and the forced tokens.

    Teacher forcing: position t's output is the model's guess for token t + 1, exactly what a step
    of generation computes after the same tokens (causal attention cannot see what comes later).
    The newest token is not read yet, so a cache is left as after a step: everything but it.
    """
    seen = torch.tensor([list(prompt_ids) + list(forced[:-1])])  # (1, T)
    hidden = model.hidden_states(seen, cache)[0, len(prompt_ids) - 1:]  # (len(forced), C)
    return model.lm_head(hidden)


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int]  # prompt + every generated token
    steps: list[Step]
    cache: KVCache | None  # after the last step: every token but the newest (None past the context)
    seconds_per_step: float


@torch.inference_mode()
def generate_steps(model: GPT, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
                   top_k: int | None = None, top_p: float | None = None, forced: list[int] = (),
                   generator: torch.Generator | None = None, use_cache: bool = True,
                   stop_ids: tuple[int, ...] = ()) -> Generation:
    """Generate one token at a time and keep each step's three distributions.

    `forced` are tokens the learner picked: step n takes forced[n] instead of sampling while the
    list lasts (a branch), then sampling goes on. The forced steps' scores come from one pass over
    the whole text (`forced_logits`), not one pass each. Stops after any of `stop_ids` (end of
    text, end of a turn).
    """
    check_sampling(temperature, top_k, top_p)
    if not prompt_ids:
        raise MicroscopeError("The prompt is empty: give the model at least one token to continue.")
    model.eval()
    ids, steps = list(prompt_ids), []
    cache = KVCache(model.config, 1, model.wte.weight.device, model.wte.weight.dtype) if use_cache else None
    started = time.perf_counter()
    fits = len(prompt_ids) + len(forced) <= model.config.context_length
    taught = forced_logits(model, prompt_ids, forced[:max_new_tokens], cache) if forced and fits else None
    for n in range(max_new_tokens):
        if taught is not None and n < len(taught):
            logits = taught[n]
        else:  # the prompt once, then one token per step; past the context the cache is dropped
            logits, cache = next_logits(model, torch.tensor([ids]), cache)
            logits = logits[0]
        raw, tempered, kept = three_distributions(logits, temperature, top_k, top_p)
        is_forced = n < len(forced)
        token = int(forced[n]) if is_forced else choose_token(kept, temperature, generator)
        steps.append(Step(len(ids), token, is_forced, raw, tempered, kept))
        ids.append(token)
        if token in stop_ids:
            break
    seconds = (time.perf_counter() - started) / max(1, len(steps))
    return Generation(list(prompt_ids), ids, steps, cache, seconds)


@torch.inference_mode()
def seconds_per_token(model: GPT, prompt_ids: list[int], n_tokens: int, use_cache: bool) -> float:
    """Greedy decoding time per new token, with or without the KV cache (the same tokens either way)."""
    model.eval()
    ids = list(prompt_ids)
    cache = KVCache(model.config, 1, model.wte.weight.device, model.wte.weight.dtype) if use_cache else None
    started = time.perf_counter()
    for _ in range(n_tokens):
        logits, cache = next_logits(model, torch.tensor([ids]), cache)
        ids.append(int(logits[0].argmax()))
    return (time.perf_counter() - started) / max(1, n_tokens)


# ---------------------------------------------------------------------------- 2. per-token loss


@torch.inference_mode()
def per_token_loss(model: GPT, ids: list[int]):
    """losses[t] = -log p(ids[t+1] | ids[0..t]) in nats: one number per predicted token (T - 1).

    Their mean is exactly the loss `model(idx, targets)` reports: cross-entropy averages these.
    """
    if len(ids) < 2:
        raise MicroscopeError("Per-token loss needs at least two tokens: one to read, one to predict.")
    model.eval()
    idx = torch.tensor([ids])  # (1, T)
    logits, _ = model(idx[:, :-1])  # (1, T-1, V): position t predicts token t+1
    return F.cross_entropy(logits[0].float(), idx[0, 1:], reduction="none")  # (T-1,)


@torch.inference_mode()
def surprise(model: GPT, ids: list[int], n_alternatives: int = 5) -> dict:
    """Per predicted token: its loss, the probability the model gave it, and the model's top guesses."""
    if len(ids) < 2:
        raise MicroscopeError("Per-token loss needs at least two tokens: one to read, one to predict.")
    model.eval()
    idx = torch.tensor([ids])
    logits, _ = model(idx[:, :-1])
    probs = F.softmax(logits[0].float(), dim=-1)  # (T-1, V)
    targets = idx[0, 1:]
    p_real = probs.gather(1, targets[:, None])[:, 0]  # (T-1,)
    top_p, top_ids = torch.topk(probs, min(n_alternatives, probs.shape[-1]), dim=-1)
    return {"losses": -p_real.clamp_min(1e-45).log(), "p_real": p_real,
            "top_ids": top_ids, "top_probs": top_p}


# ---------------------------------------------------------------------------- 3. logit lens


@torch.inference_mode()
def logit_lens(model: GPT, ids: list[int], top: int = 1) -> dict:
    """Read every layer's residual through the final norm and the output head.

    top_ids / top_probs: (L + 1, T, top), layer 0 being the embeddings. At the last layer this is
    the model's own prediction; earlier rows show the guess forming. Done one layer at a time, so
    memory stays (T, V) even for a 50k vocabulary.
    """
    if not ids:
        raise MicroscopeError("The logit lens needs at least one token.")
    model.eval()
    idx = torch.tensor([ids])
    top_ids, top_probs = [], []
    for x in model.residual_stream(idx):  # after the embeddings, then after each block
        probs = F.softmax(model.lm_head(model.ln_f(x))[0].float(), dim=-1)  # (T, V)
        p, i = torch.topk(probs, min(top, probs.shape[-1]), dim=-1)
        top_ids.append(i)
        top_probs.append(p)
    return {"top_ids": torch.stack(top_ids), "top_probs": torch.stack(top_probs)}


@torch.inference_mode()
def lens_logits(model: GPT, ids: list[int], layer: int):
    """The logits (T, V) that the lens reads at one layer (the last layer: the model's own logits)."""
    model.eval()
    x = model.residual_stream(torch.tensor([ids]))[layer]
    return model.lm_head(model.ln_f(x))[0]
