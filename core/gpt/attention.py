"""Stage 2 — attention, written out so that every step can be read and checked by hand.

Attention lets each token build its new vector as a weighted average of the other tokens' vectors,
where the weights say how relevant each other token is. Read this file top to bottom:

1. `scaled_dot_product_attention` — the whole mechanism in six numbered steps:
   scores → scale by 1/sqrt(d) → causal mask → softmax → dropout → weighted sum.
2. `attention_steps` — the same computation on a tiny six-word sentence with a seeded random
   embedding, returning every intermediate matrix (the page shows each one as a table + heatmap).
3. `SingleHeadAttention` and `MultiHeadAttentionLoop` — multi-head attention as a plain loop over
   independent heads, the easiest form to understand.
4. `MultiHeadAttention` — the same maths batched: one Linear makes Q, K and V for all heads at
   once, a reshape splits them into heads. With `need_weights=False` it takes PyTorch's fused
   `F.scaled_dot_product_attention`, the fast path the model trains with.
5. `attention_entropy` and `head_summary` — "where does this head look?" in numbers.
6. `model_attention_maps` — every layer's and head's weights from a trained model for some text.

The tests (tests/test_attention.py) prove the teaching function, the loop, the batched module,
`F.scaled_dot_product_attention` and `torch.nn.MultiheadAttention` all give the same numbers.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.gpt.errors import GlassBoxError, ModelConfigError

EXAMPLE_SENTENCE = "Your journey starts with one step"
MAX_TOY_TOKENS = 24  # the worked example is meant to be read by hand; more would not fit a screen


class AttentionInputError(GlassBoxError):
    """Text or settings the attention examples cannot work with."""


# --------------------------------------------------------------------------------------------
# 1. Scaled dot-product attention, step by step
# --------------------------------------------------------------------------------------------


def causal_mask(T_query: int, T_key: int | None = None, device=None) -> torch.Tensor:
    """(T_query, T_key) booleans, True where query i would look at a *future* key j > i.

    A language model predicts the next token, so while it reads token i it must not peek at
    tokens after i. Those positions get a score of -inf, which softmax turns into weight 0.
    """
    T_key = T_query if T_key is None else T_key
    ones = torch.ones(T_query, T_key, dtype=torch.bool, device=device)
    return torch.triu(ones, diagonal=1)  # above the diagonal = the future


def attention_dropout(weights: torch.Tensor, p: float, generator=None) -> torch.Tensor:
    """Randomly drop attention weights with probability p (training only).

    The survivors are scaled up by 1/(1-p) so that the expected total stays the same. Written by
    hand rather than with F.dropout so a seeded `generator` makes the page's picture repeatable.
    """
    keep = torch.rand(weights.shape, generator=generator, device=weights.device) >= p
    return weights * keep / (1.0 - p)


def scaled_dot_product_attention(q, k, v, causal=False, dropout_p=0.0, training=False, generator=None):
    """Attention for queries q, keys k and values v of shape (..., T, d) → (context, weights).

    `context` is (..., T, d_v): each query's weighted average of the value vectors.
    `weights` is (..., T, T): row i says how much query i looks at each key; rows sum to 1
    (after dropout in training they sum to 1 only on average, and these are the weights used).
    """
    if not 0.0 <= dropout_p < 1.0:
        raise ModelConfigError(f"Dropout must be at least 0 and below 1, not {dropout_p}.")
    d = q.size(-1)

    # Step 1 — scores: the dot product of every query with every key. A large score means
    # "this key answers what this query is looking for".
    scores = q @ k.transpose(-2, -1)  # (..., T_q, d) @ (..., d, T_k) -> (..., T_q, T_k)

    # Step 2 — scale: a dot product of d random numbers grows like sqrt(d); dividing by sqrt(d)
    # keeps the scores near 1 so softmax does not saturate into a single 1 and many 0s.
    scores = scores / math.sqrt(d)

    # Step 3 — causal mask (optional): hide the future by setting those scores to -inf.
    if causal:
        future = causal_mask(scores.size(-2), scores.size(-1), device=scores.device)
        scores = scores.masked_fill(future, float("-inf"))

    # Step 4 — softmax over the keys: each row becomes positive weights that sum to 1.
    weights = torch.softmax(scores, dim=-1)  # (..., T_q, T_k)

    # Step 5 — dropout (training only): forget some connections at random, a regulariser.
    if training and dropout_p > 0:
        weights = attention_dropout(weights, dropout_p, generator)

    # Step 6 — weighted sum: each query's context is the weights times the value vectors.
    context = weights @ v  # (..., T_q, T_k) @ (..., T_k, d_v) -> (..., T_q, d_v)
    return context, weights


# --------------------------------------------------------------------------------------------
# 2. The worked example: a six-word sentence, every intermediate kept
# --------------------------------------------------------------------------------------------


def toy_tokens(text: str) -> list[str]:
    """Split the example text on whitespace: one token per word (good enough for this toy)."""
    if not isinstance(text, str):
        raise AttentionInputError(f"The example needs text, not {type(text).__name__}.")
    tokens = text.split()
    if not tokens:
        raise AttentionInputError("Type at least one word for the attention example.")
    if len(tokens) > MAX_TOY_TOKENS:
        raise AttentionInputError(
            f"The worked example is for short sentences: {len(tokens)} words is more than "
            f"{MAX_TOY_TOKENS}. Try a sentence of about six words."
        )
    return tokens


def _rounded_randn(shape, generator, std=1.0) -> torch.Tensor:
    """Random numbers rounded to one decimal, so the learner can redo the products by hand."""
    return torch.round(torch.randn(shape, generator=generator) * std * 10) / 10


def toy_embeddings(tokens: list[str], d_model: int, seed: int) -> torch.Tensor:
    """A seeded random embedding table for the distinct words → (T, d_model) for the sentence.

    A repeated word gets the same vector each time, exactly as a real embedding layer does.
    """
    vocabulary = list(dict.fromkeys(tokens))  # distinct words, in order of first appearance
    generator = torch.Generator().manual_seed(seed)
    table = _rounded_randn((len(vocabulary), d_model), generator)  # (V, d_model)
    ids = torch.tensor([vocabulary.index(t) for t in tokens])
    return table[ids]  # (T, d_model)


def _whole_number(value, name: str) -> int:
    """Sizes and seeds come from sliders or the command line: accept whole numbers only."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value \
            or value != int(value):
        raise AttentionInputError(f"The {name} must be a whole number, not {value!r}.")
    return int(value)


def _check_sizes(d_model: int, d_head: int, n_heads: int, dropout_p: float) -> None:
    d_model = _whole_number(d_model, "embedding size")
    d_head = _whole_number(d_head, "head dimension")
    n_heads = _whole_number(n_heads, "number of heads")
    if not isinstance(dropout_p, (int, float)):
        raise AttentionInputError(f"Dropout must be a number, not {dropout_p!r}.")
    if not 1 <= d_model <= 64:
        raise AttentionInputError(f"The embedding size must be between 1 and 64, not {d_model}.")
    if not 1 <= d_head <= 64:
        raise AttentionInputError(f"The head dimension must be between 1 and 64, not {d_head}.")
    if not 1 <= n_heads <= 16:
        raise AttentionInputError(f"The number of heads must be between 1 and 16, not {n_heads}.")
    if not 0.0 <= dropout_p < 1.0:
        raise AttentionInputError(f"Dropout must be at least 0 and below 1, not {dropout_p}.")


def attention_steps(text: str = EXAMPLE_SENTENCE, seed: int = 0, d_model: int = 4, d_head: int = 4,
                    n_heads: int = 1, causal: bool = False, dropout_p: float = 0.0) -> dict:
    """Run attention on a tiny example and keep every intermediate (tensors, one per head).

    Returns a dict with
      tokens (list[str]), X (T, d_model) embeddings, W_q / W_k / W_v (H, d_model, d_head),
      Q / K / V (H, T, d_head), scores (H, T, T), scale (float = 1/sqrt(d_head)),
      scaled (H, T, T), mask (T, T) bool (True = hidden future), masked (H, T, T) with -inf,
      weights (H, T, T) after softmax, dropped (H, T, T) after dropout (= weights if none),
      context (H, T, d_head), output (T, H * d_head) — the heads' contexts side by side.
    """
    _check_sizes(d_model, d_head, n_heads, dropout_p)
    d_model, d_head, n_heads = int(d_model), int(d_head), int(n_heads)
    seed = _whole_number(seed, "seed")
    tokens = toy_tokens(text)
    T = len(tokens)
    X = toy_embeddings(tokens, d_model, seed)  # (T, d_model)

    # Each head has its own three projection matrices. A second generator (seed + 1) keeps
    # the embeddings unchanged when only the head settings move. Standard deviation
    # 1/sqrt(d_model), as nn.Linear's initialisation, keeps Q, K and V entries near size 1, so
    # the scores grow like sqrt(d_head) — exactly what step 2 divides away.
    generator = torch.Generator().manual_seed(seed + 1)
    std = 1 / math.sqrt(d_model)
    W_q = _rounded_randn((n_heads, d_model, d_head), generator, std)
    W_k = _rounded_randn((n_heads, d_model, d_head), generator, std)
    W_v = _rounded_randn((n_heads, d_model, d_head), generator, std)

    Q = X @ W_q  # (T, d_model) @ (H, d_model, d_head) -> (H, T, d_head)
    K = X @ W_k
    V = X @ W_v

    scores = Q @ K.transpose(-2, -1)  # (H, T, T)
    scale = 1.0 / math.sqrt(d_head)
    scaled = scores * scale
    mask = causal_mask(T) if causal else torch.zeros(T, T, dtype=torch.bool)
    masked = scaled.masked_fill(mask, float("-inf"))
    weights = torch.softmax(masked, dim=-1)
    if dropout_p > 0:
        dropped = attention_dropout(weights, dropout_p, torch.Generator().manual_seed(seed + 2))
    else:
        dropped = weights
    context = dropped @ V  # (H, T, d_head)
    output = context.transpose(0, 1).reshape(T, n_heads * d_head)  # heads side by side

    return {
        "tokens": tokens, "X": X, "W_q": W_q, "W_k": W_k, "W_v": W_v,
        "Q": Q, "K": K, "V": V, "scores": scores, "scale": scale, "scaled": scaled,
        "mask": mask, "masked": masked, "weights": weights, "dropped": dropped,
        "context": context, "output": output,
    }


# --------------------------------------------------------------------------------------------
# 3. Multi-head attention as a loop over single heads
# --------------------------------------------------------------------------------------------


class SingleHeadAttention(nn.Module):
    """One attention head: its own query, key and value projections, then attention."""

    def __init__(self, d_in, d_head, causal=False, dropout=0.0, qkv_bias=False):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_head, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_head, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_head, bias=qkv_bias)
        self.causal = causal
        self.dropout = dropout

    def forward(self, x):  # x: (B, T, d_in)
        q = self.W_query(x)  # (B, T, d_head)
        k = self.W_key(x)
        v = self.W_value(x)
        return scaled_dot_product_attention(q, k, v, causal=self.causal, dropout_p=self.dropout,
                                            training=self.training)


def _head_size(d_out: int, num_heads: int) -> int:
    if num_heads < 1 or d_out % num_heads != 0:
        raise ModelConfigError(
            f"The width {d_out} must split evenly into {num_heads} heads "
            f"(choose a number of heads that divides {d_out})."
        )
    return d_out // num_heads


class MultiHeadAttentionLoop(nn.Module):
    """Multi-head attention, the readable way: run H independent heads and concatenate.

    forward(x) returns (output (B, T, d_out), weights (B, H, T, T)).
    """

    def __init__(self, d_in, d_out, num_heads, causal=False, dropout=0.0, qkv_bias=False):
        super().__init__()
        d_head = _head_size(d_out, num_heads)
        self.heads = nn.ModuleList(
            SingleHeadAttention(d_in, d_head, causal, dropout, qkv_bias) for _ in range(num_heads)
        )
        self.out_proj = nn.Linear(d_out, d_out)  # mixes what the heads found

    def forward(self, x):  # x: (B, T, d_in)
        results = [head(x) for head in self.heads]  # H pairs of (context, weights)
        context = torch.cat([c for c, _ in results], dim=-1)  # (B, T, H * d_head) = (B, T, d_out)
        weights = torch.stack([w for _, w in results], dim=1)  # (B, H, T, T)
        return self.out_proj(context), weights


# --------------------------------------------------------------------------------------------
# 4. The same maths batched: one projection for Q, K and V, reshape into heads
# --------------------------------------------------------------------------------------------


class MultiHeadAttention(nn.Module):
    """Multi-head attention as models write it: all heads in one matrix multiply.

    forward(x, need_weights=True) returns (output (B, T, d_out), weights (B, H, T, T)).
    With need_weights=False it uses PyTorch's fused F.scaled_dot_product_attention (the fast
    path training uses), which never builds the weights, and returns (output, None).
    """

    def __init__(self, d_in, d_out, num_heads, causal=False, dropout=0.0, qkv_bias=False):
        super().__init__()
        self.d_head = _head_size(d_out, num_heads)
        self.d_out = d_out
        self.num_heads = num_heads
        self.causal = causal
        self.dropout = dropout
        # The H heads' query, key and value matrices stacked into one (d_in → 3·d_out) layer.
        self.qkv = nn.Linear(d_in, 3 * d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)

    def forward(self, x, need_weights=True):  # x: (B, T, d_in)
        B, T, _ = x.shape
        q, k, v = self.qkv(x).split(self.d_out, dim=-1)  # each (B, T, d_out)
        # Split the channels into heads: (B, T, d_out) -> (B, T, H, d_head) -> (B, H, T, d_head).
        q = q.view(B, T, self.num_heads, self.d_head).transpose(1, 2)
        k = k.view(B, T, self.num_heads, self.d_head).transpose(1, 2)
        v = v.view(B, T, self.num_heads, self.d_head).transpose(1, 2)
        dropout_p = self.dropout if self.training else 0.0
        if need_weights:
            context, weights = scaled_dot_product_attention(
                q, k, v, causal=self.causal, dropout_p=dropout_p, training=self.training)
        else:
            context = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=self.causal)
            weights = None
        # Put the heads side by side again: (B, H, T, d_head) -> (B, T, H, d_head) -> (B, T, d_out).
        context = context.transpose(1, 2).contiguous().view(B, T, self.d_out)
        return self.out_proj(context), weights

    @classmethod
    def from_loop(cls, loop: MultiHeadAttentionLoop) -> "MultiHeadAttention":
        """The batched module with exactly the loop's weights: proof the two are the same maths.

        Stacking the heads' query matrices on top of each other gives the batched query matrix
        (and the same for keys and values); the reshape in forward() undoes the stacking.
        """
        first = loop.heads[0]
        d_in = first.W_query.in_features
        d_out = loop.out_proj.in_features
        has_bias = first.W_query.bias is not None
        batched = cls(d_in, d_out, len(loop.heads), first.causal, first.dropout, has_bias)
        with torch.no_grad():
            for part, name in enumerate(["W_query", "W_key", "W_value"]):
                rows = slice(part * d_out, (part + 1) * d_out)
                batched.qkv.weight[rows] = torch.cat([getattr(h, name).weight for h in loop.heads])
                if has_bias:
                    batched.qkv.bias[rows] = torch.cat([getattr(h, name).bias for h in loop.heads])
            batched.out_proj.load_state_dict(loop.out_proj.state_dict())
        return batched


# --------------------------------------------------------------------------------------------
# 5. Where does a head look?
# --------------------------------------------------------------------------------------------


def attention_entropy(weights: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of each row of attention weights: (..., T_q, T_k) -> (..., T_q).

    0 bits: the query looks at exactly one token. log2(n) bits: it spreads evenly over n tokens.
    """
    p = weights.clamp_min(0)
    log_p = torch.where(p > 0, torch.log2(p.clamp_min(1e-30)), torch.zeros_like(p))
    return -(p * log_p).sum(dim=-1)


def head_summary(maps: torch.Tensor, causal: bool = True) -> list[dict]:
    """One row per (layer, head) of maps (L, H, T, T): how focused it is and where it looks.

    entropy_bits: mean row entropy. focus: 1 - entropy / max possible entropy (1 = always one
    token, 0 = evenly spread). self / previous / first: average weight on the token itself, the
    token just before, and the first token. looks_at: the strongest of those habits, or
    "spread out" / "mixed".
    """
    L, H, T, _ = maps.shape
    maps = maps.float()
    rows = torch.arange(T)
    if causal:
        visible = rows + 1  # query i sees keys 0..i
    else:
        visible = torch.full((T,), T)
    max_entropy = torch.log2(visible.float())  # (T,)
    later = rows >= 1  # the first query has nobody before it: leave it out of "previous"/"first"
    summary = []
    for layer in range(L):
        for head in range(H):
            w = maps[layer, head]  # (T, T)
            entropy = attention_entropy(w)  # (T,)
            has_choice = max_entropy > 0
            if has_choice.any():
                focus = 1 - (entropy[has_choice] / max_entropy[has_choice]).mean().item()
            else:
                focus = 1.0
            on_self = w.diagonal().mean().item()
            if later.any():
                on_previous = w[rows[later], rows[later] - 1].mean().item()
                on_first = w[later, 0].mean().item()
            else:
                on_previous = on_first = 0.0
            habits = {"itself": on_self, "the previous token": on_previous, "the first token": on_first}
            strongest = max(habits, key=habits.get)
            if habits[strongest] >= 0.5:
                looks_at = strongest
            elif focus < 0.25:
                looks_at = "spread out"
            else:
                looks_at = "mixed"
            summary.append({
                "layer": layer, "head": head, "entropy_bits": entropy.mean().item(),
                "focus": focus, "self": on_self, "previous": on_previous, "first": on_first,
                "looks_at": looks_at,
            })
    return summary


# --------------------------------------------------------------------------------------------
# 6. Attention maps of a trained model
# --------------------------------------------------------------------------------------------


def model_attention_maps(model, tokenizer, text: str, max_tokens: int = 64):
    """Every layer's and head's attention weights for `text` → (token strings, maps (L, H, T, T)).

    The text is cut to the model's context length (and to max_tokens, to keep the pictures
    readable). Uses the model's own `attention_maps(idx)` (core/gpt/model.py).
    """
    ids = tokenizer.encode(text)
    if not ids:
        raise AttentionInputError("Type some text to see where the model's heads look.")
    limit = min(max_tokens, model.config.context_length)
    ids = ids[:limit]
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        maps = model.attention_maps(torch.tensor([ids], dtype=torch.long, device=device))  # (L, H, T, T)
    if maps.dim() == 5:  # (L, B, H, T, T) with a batch of one
        maps = maps[:, 0]
    tokens = [tokenizer.token_text(i) for i in ids]
    return tokens, maps.detach().float().cpu()
