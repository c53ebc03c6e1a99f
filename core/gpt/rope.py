"""Rotary position embeddings (RoPE): where a token sits is told by *rotating* its query and key.

GPT-2 adds a learned position vector to each token. RoPE (Su et al., 2021; used by Llama, Qwen,
SmolLM, Mistral...) adds nothing: before attention it rotates each query and each key by an angle
proportional to the token's position. Split a head's `hs` numbers into hs/2 pairs; pair i at position
m turns by the angle m·θ_i, with θ_i = base^(-2i/hs), so the first pairs spin fast and the last ones
barely move (many "clock hands" of different speeds).

Why it works: rotating q by angle a and k by angle b changes their dot product to one of q and k
rotated by (a - b) alone. So the attention score of a query at position m and a key at position n
depends on the content and on the *distance* m - n, never on m and n themselves
(`relative_position_scores` shows it numerically; tests/test_modern.py checks it on random vectors).

Pairing convention: Hugging Face's Llama code pairs dimension i with dimension i + hs/2
(`rotate_half`), not neighbours (2i, 2i + 1) as the paper writes. The maths is the same up to a
fixed reordering of a head's dimensions; following Hugging Face lets Llama weights load unchanged.
"""

import torch

from core.gpt.errors import ModelConfigError


def rope_cos_sin(n_positions: int, head_size: int, base: float = 10000.0, start: int = 0, device=None):
    """cos and sin of every position's angles: two (n_positions, head_size) tables.

    Row m holds cos(m·θ_i) and sin(m·θ_i) for the hs/2 pairs, written twice (once for each half
    of the head, the layout `rotate_half` expects).
    """
    if head_size % 2:
        raise ModelConfigError(
            f"RoPE rotates pairs of numbers, so a head needs an even size (got {head_size}). "
            "Change n_embd or n_head so that n_embd / n_head is even."
        )
    theta = base ** (-torch.arange(0, head_size, 2, dtype=torch.float32, device=device) / head_size)
    positions = torch.arange(start, start + n_positions, dtype=torch.float32, device=device)
    angles = torch.outer(positions, theta)  # (T, hs/2): position m times each pair's speed
    angles = torch.cat((angles, angles), dim=-1)  # (T, hs): dimension i and i + hs/2 share an angle
    return angles.cos(), angles.sin()


def rotate_half(x):
    """(x1, x2) -> (-x2, x1) for the two halves of the last dimension: a 90° turn of every pair."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    """Rotate every pair (x_i, x_{i+hs/2}) of x (..., T, hs) by its position's angle.

    The 2-D rotation (a, b) -> (a·cos - b·sin, a·sin + b·cos), for all pairs at once.
    """
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


def relative_position_scores(q, k, n_positions: int = 16, base: float = 10000.0):
    """The score q·k after rotating q to position m and k to position n, for every (m, n):
    an (n_positions, n_positions) table. Every diagonal (same m - n) holds one value."""
    cos, sin = rope_cos_sin(n_positions, q.shape[-1], base)
    q_at = apply_rope(q.expand(n_positions, -1), cos, sin)  # (T, hs): q placed at each position
    k_at = apply_rope(k.expand(n_positions, -1), cos, sin)
    return q_at @ k_at.T  # [m, n] = rotated q at m · rotated k at n
