"""The embedding map: PCA of the token embeddings (checked against numpy), cosine neighbours, positions."""

import numpy as np
import pytest
import torch

from core.gpt.embeddings import (EmbeddingError, embedding_map, find_token, nearest_neighbours, pca,
                                 position_similarity, token_embeddings)
from core.gpt.model import GPT, GPTConfig
from core.gpt.tokenizers import train_char


def model(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=30, context_length=16, n_embd=24, n_head=2, n_layer=1, **kw))


def test_pca_matches_numpy_on_the_token_embedding_matrix():
    m = model()
    with torch.no_grad():  # give wte a clear main direction, unlike wpe, so the wrong matrix shows
        m.wte.weight[:, 0] *= 10
    projection = embedding_map(m)
    wte = m.wte.weight.detach().numpy().astype(np.float64)
    centred = wte - wte.mean(axis=0)
    eigvals, eigvecs = np.linalg.eigh(np.cov(centred, rowvar=False, bias=True))
    order = np.argsort(eigvals)[::-1]
    explained = eigvals[order] / eigvals.sum()
    assert projection.coords.shape == (30, 2)
    assert projection.explained.numpy() == pytest.approx(explained[:2], rel=1e-4)
    assert 0 < float(projection.explained.sum()) <= 1 and projection.explained[0] >= projection.explained[1]
    reference = centred @ eigvecs[:, order[:2]]
    for k in range(2):  # the same axes up to their (arbitrary) sign
        a, b = projection.coords[:, k].numpy(), reference[:, k]
        assert min(np.abs(a - b).max(), np.abs(a + b).max()) < 1e-3
    assert token_embeddings(m).data_ptr() == m.wte.weight.data_ptr()  # wte, not wpe or lm_head


def test_pca_of_points_on_a_line_explains_all_the_variance():
    t = torch.linspace(-1, 1, 50)[:, None]
    points = torch.cat([t, 2 * t, -t], dim=1) + 3.0  # a line in 3-D, off the origin
    projection = pca(points)
    assert float(projection.explained[0]) == pytest.approx(1.0, abs=1e-5)
    assert float(projection.coords[:, 1].abs().max()) < 1e-4


def test_nearest_neighbours_start_with_the_token_itself_then_by_cosine():
    matrix = torch.randn(40, 8)
    matrix[7] = matrix[3] * 2.5  # same direction as row 3, longer
    found = nearest_neighbours(matrix, 3, k=5)
    assert found[0] == (3, pytest.approx(1.0))
    assert found[1][0] == 7 and found[1][1] == pytest.approx(1.0, abs=1e-5)
    cosines = [c for _, c in found]
    assert cosines == sorted(cosines, reverse=True) and len(found) == 5
    with pytest.raises(EmbeddingError, match="not in the vocabulary"):
        nearest_neighbours(matrix, 40)


def test_find_token_and_a_token_not_in_the_vocabulary():
    tok = train_char("hello world")
    assert tok.token_text(find_token(tok, "o")) == "o"
    with pytest.raises(EmbeddingError, match="not a single token"):
        find_token(tok, "z")
    with pytest.raises(EmbeddingError, match="written with 2 tokens"):
        find_token(tok, "he")
    with pytest.raises(EmbeddingError, match="Type a token"):
        find_token(tok, "")


def test_position_similarity_is_a_cosine_matrix_and_absent_for_rotary_models():
    sim = position_similarity(model())
    assert sim.shape == (16, 16)
    assert torch.allclose(sim.diagonal(), torch.ones(16), atol=1e-5) and torch.allclose(sim, sim.T, atol=1e-6)
    assert float(sim.abs().max()) <= 1 + 1e-5
    assert position_similarity(model(position="rope")) is None
