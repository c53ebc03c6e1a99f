"""Stage 2, attention: the worked example on a short sentence, a trained model's heads, and RoPE.

    python -m core attention --text "Your journey starts with one step" --heads 2 --causal

Runs the worked example of core/gpt/attention.py on your text (split into words, embedded with a
seeded random table) and prints every step — Q, K, V, scores, scaled scores, weights, context — on
stderr, one small table per head. The JSON last line on stdout holds `tokens` (the words) and
`weights` (nested lists, shape heads × tokens × tokens; row i = where word i looks).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from core.gpt import attention as att
from core.gpt import rope
from core.gpt.errors import GlassBoxError  # noqa: F401  (the page catches it from here)
from core.lab import models
from core.lab.cli import option

COMMAND = "attention"
LANGUAGE_MODEL_STAGES = models.LANGUAGE_MODEL_STAGES
EXAMPLE_SENTENCE = att.EXAMPLE_SENTENCE


@dataclass
class Settings:
    text: str = option(EXAMPLE_SENTENCE, help=f'a short sentence, split on spaces (default: "{EXAMPLE_SENTENCE}")')
    heads: int = option(1, help="number of attention heads (default 1)")
    causal: bool = option(False, help="hide future words (as a GPT does)")
    seed: int = option(0, help="seed of the random embeddings and weights")
    dim: int = option(4, help="head dimension d: the length of each query, key and value vector (default 4)")
    embed_dim: int = option(4, help="length of each word's embedding (default 4)")
    dropout: float = option(0.0, help="attention dropout probability (default 0)")


# ---------------------------------------------------------------------------- part 1: by hand


def worked_example(settings: Settings) -> dict:
    """Every intermediate of attention on the settings' sentence (core.gpt.attention.attention_steps)."""
    return att.attention_steps(settings.text, seed=settings.seed, d_model=settings.embed_dim,
                               d_head=settings.dim, n_heads=settings.heads, causal=settings.causal,
                               dropout_p=settings.dropout)


def score_by_hand(s: dict, h: int, i: int, j: int, words: list[str]) -> str:
    """One score of head h (query word i, key word j) spelt out as its sum of products."""
    x, w_q = s["X"][i].tolist(), s["W_q"][h, :, 0].tolist()
    q_first = " + ".join(f"({a:.1f}×{b:.1f})" for a, b in zip(x, w_q))
    q, k = s["Q"][h, i].tolist(), s["K"][h, j].tolist()
    terms = " + ".join(f"({a:.2f}×{b:.2f})" for a, b in zip(q, k))
    score = sum(a * b for a, b in zip(q, k))
    row = s["masked"][h, i].tolist()
    visible = [v for v in row if v != float("-inf")]
    weight = math.exp(row[j]) / sum(math.exp(v) for v in visible) if row[j] != float("-inf") else 0.0
    return (f"Q[{words[i]}, d0] = x · W_q[:, 0] = {q_first} = {q[0]:.2f}\n"
            f"score  = Q[{words[i]}] · K[{words[j]}] = {terms}\n       = {score:.3f}\n"
            f"scaled = {score:.3f} × {s['scale']:.3f} = {score * s['scale']:.3f}\n"
            f"weight = exp(scaled) / sum of exp over the row's {len(visible)} visible scores = {weight:.3f}")


def format_matrix(title, matrix, row_labels, col_labels, digits=2) -> str:
    """A small labelled table of numbers, for reading in a terminal."""
    width = max(digits + 5, *(len(c) for c in col_labels))
    label_width = max(len(r) for r in row_labels)
    lines = [title, " " * label_width + " " + " ".join(c.rjust(width) for c in col_labels)]
    for label, row in zip(row_labels, matrix.tolist()):
        cells = " ".join(f"{x:{width}.{digits}f}" if x != float("-inf") else "-inf".rjust(width) for x in row)
        lines.append(label.rjust(label_width) + " " + cells)
    return "\n".join(lines)


def _print_head(steps: dict, h: int, settings: Settings, show) -> None:
    tokens, dims = steps["tokens"], [f"d{i}" for i in range(settings.dim)]
    show(f"\n=== head {h} ===")
    show(format_matrix("Q = X @ W_q (what each word is looking for)", steps["Q"][h], tokens, dims))
    show(format_matrix("K = X @ W_k (what each word offers)", steps["K"][h], tokens, dims))
    show(format_matrix("V = X @ W_v (what each word passes on)", steps["V"][h], tokens, dims))
    show(format_matrix("scores = Q @ K^T", steps["scores"][h], tokens, tokens))
    show(format_matrix(f"scaled scores = scores * 1/sqrt({settings.dim}) = scores * {steps['scale']:.3f}"
                       + (" (future masked to -inf)" if settings.causal else ""),
                       steps["masked"][h], tokens, tokens))
    show(format_matrix("weights = softmax(scaled scores), each row sums to 1",
                       steps["weights"][h], tokens, tokens, digits=3))
    if settings.dropout > 0:
        show(format_matrix(f"weights after dropout p={settings.dropout}", steps["dropped"][h], tokens, tokens, 3))
    show(format_matrix("context = weights @ V", steps["context"][h], tokens, dims))


def run(settings: Settings, progress=None) -> dict:
    """Print the worked example on stderr; return the words, the weights and each head's entropy."""
    steps = worked_example(settings)
    tokens = steps["tokens"]

    def show(text=""):
        print(text, file=sys.stderr)

    show(f"tokens: {tokens}")
    show(format_matrix("X: word embeddings (random, seeded)", steps["X"], tokens,
                       [f"e{i}" for i in range(settings.embed_dim)]))
    for h in range(settings.heads):
        _print_head(steps, h, settings, show)
    entropy = att.attention_entropy(steps["weights"]).mean(-1)  # (H,) mean bits per head
    return {
        "tokens": tokens,
        "weights": [[[round(x, 4) for x in row] for row in head] for head in steps["weights"].tolist()],
        "heads": settings.heads,
        "head_dim": settings.dim,
        "causal": bool(settings.causal),
        "seed": settings.seed,
        "entropy_bits": [round(x, 4) for x in entropy.tolist()],
    }


# ---------------------------------------------------------------------------- part 2: a trained model


def results(run_id: str, text: str, max_tokens: int = 24) -> dict:
    """Where a trained model's heads look on `text`: tokens, maps (L, H, T, T) and a summary per head."""
    model, tokenizer = models.cached_model_run(run_id)
    tokens, maps = att.model_attention_maps(model, tokenizer, text, max_tokens=max_tokens)
    return {"tokens": tokens, "maps": maps, "summary": att.head_summary(maps, causal=True),
            "layers": maps.shape[0], "heads": maps.shape[1]}


# ---------------------------------------------------------------------------- part 3: RoPE


def rope_example(seed: int = 0, query_position: int = 5, key_position: int = 2, head_size: int = 8,
                 n_positions: int = 12, base: float = 10000.0) -> dict:
    """A random query and key, rotated by RoPE to two positions, and the score table of all positions.

    `pairs`: the first (fastest) pair of q and k before and after rotation, as 2-D points.
    `scores`: (n_positions, n_positions) table [m, n] = q at m · k at n; constant along diagonals.
    """
    if not 0 <= query_position < n_positions or not 0 <= key_position < n_positions:
        raise att.AttentionInputError(f"Positions must be between 0 and {n_positions - 1}.")
    g = torch.Generator().manual_seed(int(seed))
    q, k = torch.randn(head_size, generator=g), torch.randn(head_size, generator=g)
    cos, sin = rope.rope_cos_sin(n_positions, head_size, base)
    q_at = rope.apply_rope(q.expand(n_positions, -1), cos, sin)  # q placed at every position
    k_at = rope.apply_rope(k.expand(n_positions, -1), cos, sin)
    half = head_size // 2
    scores = rope.relative_position_scores(q, k, n_positions, base)
    distance = query_position - key_position
    same_distance = [(m, m - distance) for m in range(n_positions) if 0 <= m - distance < n_positions]
    return {
        "q": q.tolist(), "k": k.tolist(), "query_position": query_position, "key_position": key_position,
        "pairs": {"q": (q[0].item(), q[half].item()), "k": (k[0].item(), k[half].item()),
                  "q_rotated": (q_at[query_position, 0].item(), q_at[query_position, half].item()),
                  "k_rotated": (k_at[key_position, 0].item(), k_at[key_position, half].item())},
        "scores": scores, "score": scores[query_position, key_position].item(),
        "same_distance": [(m, n, scores[m, n].item()) for m, n in same_distance],
        "plain_score": (q @ k).item(),
    }


CODE = {
    "attention": (att.scaled_dot_product_attention,),
    "causal_mask": (att.causal_mask,),
    "model_maps": (att.model_attention_maps,),
    "head_summary": (att.attention_entropy, att.head_summary),
    "rope": (rope.rope_cos_sin, rope.rotate_half, rope.apply_rope),
    "rope_scores": (rope.relative_position_scores,),
}
