"""What the embeddings learned: a map of the token vectors, their nearest neighbours, and positions.

Every token id owns one row of `wte`, a vector of `n_embd` numbers. At step 0 the rows are random
noise; as the model trains, tokens that behave alike (digits, vowels, capitals for characters;
related words for BPE) move close together, because the layers above can then treat them alike.

A vector of 192 numbers cannot be drawn, so we project the rows onto the two directions in which
they spread the most (principal component analysis, PCA). The share of the spread those two
directions hold ("variance explained") says how faithful the flat picture is. Closeness is
measured the way the model's dot products see it: by the cosine of the angle between two rows.

For a model with learned positions, `wpe` holds one vector per position; the cosine similarity of
every pair of positions shows how the model learned that "near" positions are alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.gpt.errors import GlassBoxError


class EmbeddingError(GlassBoxError):
    """A token or a model the embedding map cannot show."""


@dataclass
class Projection:
    coords: torch.Tensor  # (V, k): each row projected on the top-k principal directions
    explained: torch.Tensor  # (k,): share of the total variance each direction holds (0-1)
    directions: torch.Tensor  # (k, C): the principal directions, unit vectors


def pca(matrix: torch.Tensor, k: int = 2) -> Projection:
    """Project the rows of `matrix` (N, C) onto its top-k principal directions.

    Centre the rows (PCA measures spread around the mean), then the singular value decomposition
    gives the directions of greatest spread (rows of Vh), in order; the squared singular values
    are the variance along each.
    """
    x = matrix.detach().float()
    x = x - x.mean(dim=0, keepdim=True)  # (N, C), centred
    _, s, vh = torch.linalg.svd(x, full_matrices=False)  # s: (min(N, C),), vh: (min(N, C), C)
    k = min(k, vh.shape[0])
    variance = s**2
    explained = variance[:k] / variance.sum().clamp_min(1e-12)
    directions = vh[:k]
    # The sign of a singular vector is arbitrary: fix it (largest |component| positive), so the map of
    # one snapshot does not flip against the next for no reason.
    signs = torch.sign(directions.gather(1, directions.abs().argmax(dim=1, keepdim=True))).squeeze(1)
    directions = directions * signs[:, None]
    return Projection(coords=x @ directions.T, explained=explained, directions=directions)


def token_embeddings(model) -> torch.Tensor:
    """The token embedding matrix `wte`, (V, C): one learned vector per token id."""
    return model.wte.weight.detach()


def embedding_map(model, k: int = 2) -> Projection:
    """The PCA of the model's token embeddings: what page 4's map draws."""
    return pca(token_embeddings(model), k)


def nearest_neighbours(matrix: torch.Tensor, index: int, k: int = 8) -> list[tuple[int, float]]:
    """The `k` rows closest to row `index` by cosine similarity, as (row, cosine), closest first.

    The row itself comes first, with cosine 1: every vector points exactly its own way.
    """
    if not 0 <= index < matrix.shape[0]:
        raise EmbeddingError(f"Token id {index} is not in the vocabulary (0 to {matrix.shape[0] - 1}).")
    unit = F.normalize(matrix.detach().float(), dim=1)  # (V, C), each row of length 1
    cosines = unit @ unit[index]  # (V,): cos(angle) between row `index` and every row
    cosines[index] = 1.0  # exactly, whatever the rounding (a zero row too)
    values, rows = torch.topk(cosines, min(k, len(cosines)))
    order = sorted(zip(rows.tolist(), values.tolist()), key=lambda p: (p[0] != index, -p[1]))
    return order


def find_token(tokenizer, query: str) -> int:
    """The id of the token whose text is `query` (a search box's answer), or a clear error."""
    if not query:
        raise EmbeddingError("Type a token to look for.")
    for token_id in range(tokenizer.vocab_size):
        if tokenizer.token_text(token_id) == query:
            return token_id
    ids = tokenizer.encode(query) if hasattr(tokenizer, "encode") else []
    hint = f" It is written with {len(ids)} tokens here; search for one of them." if len(ids) > 1 else ""
    raise EmbeddingError(f"{query!r} is not a single token of this vocabulary ({tokenizer.vocab_size:,} tokens).{hint}")


def position_similarity(model) -> torch.Tensor | None:
    """(T, T) cosine similarity between the learned position vectors (None: the model has none,
    e.g. it uses rotary positions)."""
    wpe = getattr(model, "wpe", None)
    if wpe is None:
        return None
    unit = F.normalize(wpe.weight.detach().float(), dim=1)  # (T, C)
    return unit @ unit.T  # (T, T)
