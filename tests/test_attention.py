"""Stage 2: the teaching attention agrees with PyTorch's, and the worked example adds up."""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from core.gpt import attention as att
from core.gpt.errors import GlassBoxError
from core.lab import cli
from core.stages import attention as cmd

REPO = Path(__file__).resolve().parent.parent
TOL = 1e-5


def random_qkv(shape=(2, 3, 7, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


@pytest.mark.parametrize("causal", [False, True])
def test_teaching_function_matches_torch_fused(causal):
    q, k, v = random_qkv()
    context, weights = att.scaled_dot_product_attention(q, k, v, causal=causal)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert context.shape == (2, 3, 7, 8) and weights.shape == (2, 3, 7, 7)
    torch.testing.assert_close(context, expected, atol=TOL, rtol=TOL)


@pytest.mark.parametrize("causal", [False, True])
def test_weights_rows_sum_to_one_and_causal_hides_the_future(causal):
    q, k, v = random_qkv()
    _, weights = att.scaled_dot_product_attention(q, k, v, causal=causal)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, 7), atol=TOL, rtol=TOL)
    above_diagonal = weights[..., torch.triu(torch.ones(7, 7, dtype=torch.bool), diagonal=1)]
    if causal:
        assert torch.all(above_diagonal == 0)
    else:
        assert torch.all(above_diagonal > 0)


def test_causal_first_token_looks_only_at_itself():
    q, k, v = random_qkv((1, 5, 4))
    context, weights = att.scaled_dot_product_attention(q, k, v, causal=True)
    assert weights[0, 0, 0].item() == pytest.approx(1.0)
    torch.testing.assert_close(context[0, 0], v[0, 0])


def test_dropout_only_in_training_and_repeatable_with_a_generator():
    q, k, v = random_qkv((1, 6, 4))
    _, eval_w = att.scaled_dot_product_attention(q, k, v, dropout_p=0.5, training=False)
    _, plain = att.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(eval_w, plain)
    _, a = att.scaled_dot_product_attention(q, k, v, dropout_p=0.5, training=True,
                                            generator=torch.Generator().manual_seed(3))
    _, b = att.scaled_dot_product_attention(q, k, v, dropout_p=0.5, training=True,
                                            generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    dropped = a == 0
    assert 0 < dropped.float().mean().item() < 1
    torch.testing.assert_close(a[~dropped], plain[~dropped] * 2)  # survivors scaled by 1/(1-p)
    with pytest.raises(GlassBoxError):
        att.scaled_dot_product_attention(q, k, v, dropout_p=1.0, training=True)


def copy_into_torch_multihead(mha: att.MultiHeadAttention) -> nn.MultiheadAttention:
    """PyTorch's own module with our weights: in_proj is our qkv, stacked q, k, v."""
    ref = nn.MultiheadAttention(mha.d_out, mha.num_heads, bias=True, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(mha.qkv.weight)
        ref.in_proj_bias.copy_(mha.qkv.bias if mha.qkv.bias is not None else torch.zeros(3 * mha.d_out))
        ref.out_proj.weight.copy_(mha.out_proj.weight)
        ref.out_proj.bias.copy_(mha.out_proj.bias)
    return ref.eval()


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_loop_batched_fused_and_torch_multihead_agree(causal, qkv_bias):
    torch.manual_seed(0)
    d, heads, T = 12, 3, 9
    x = torch.randn(2, T, d)
    loop = att.MultiHeadAttentionLoop(d, d, heads, causal=causal, qkv_bias=qkv_bias).eval()
    batched = att.MultiHeadAttention.from_loop(loop).eval()
    torch_mha = copy_into_torch_multihead(batched)

    out_loop, w_loop = loop(x)
    out_batched, w_batched = batched(x)
    out_fused, w_fused = batched(x, need_weights=False)
    mask = att.causal_mask(T) if causal else None
    out_torch, w_torch = torch_mha(x, x, x, attn_mask=mask, need_weights=True, average_attn_weights=False)

    assert out_loop.shape == (2, T, d) and w_loop.shape == (2, heads, T, T) and w_fused is None
    for out in (out_batched, out_fused, out_torch):
        torch.testing.assert_close(out, out_loop, atol=TOL, rtol=TOL)
    for w in (w_batched, w_torch):
        torch.testing.assert_close(w, w_loop, atol=TOL, rtol=TOL)
    torch.testing.assert_close(w_loop.sum(-1), torch.ones(2, heads, T), atol=TOL, rtol=TOL)
    if causal:
        assert torch.all(w_batched[..., att.causal_mask(T)] == 0)


def test_loop_may_project_to_a_different_width():
    x = torch.randn(1, 5, 6)
    loop = att.MultiHeadAttentionLoop(6, 8, 2).eval()
    out, weights = loop(x)
    assert out.shape == (1, 5, 8) and weights.shape == (1, 2, 5, 5)
    out_b, _ = att.MultiHeadAttention.from_loop(loop).eval()(x)
    torch.testing.assert_close(out_b, out, atol=TOL, rtol=TOL)


def test_heads_must_divide_the_width():
    with pytest.raises(GlassBoxError, match="split evenly"):
        att.MultiHeadAttention(8, 10, 3)


@pytest.mark.parametrize("causal", [False, True])
def test_worked_example_every_step_checks_out(causal):
    s = att.attention_steps(seed=5, d_model=4, d_head=4, n_heads=2, causal=causal)
    assert s["tokens"] == ["Your", "journey", "starts", "with", "one", "step"]
    T = 6
    assert s["X"].shape == (T, 4) and s["Q"].shape == (2, T, 4) and s["weights"].shape == (2, T, T)
    # Embeddings and projections are rounded to one decimal: checkable by hand.
    torch.testing.assert_close(s["X"] * 10, torch.round(s["X"] * 10))
    torch.testing.assert_close(s["Q"], s["X"] @ s["W_q"])
    torch.testing.assert_close(s["scores"][1, 2, 3], s["Q"][1, 2] @ s["K"][1, 3])
    assert s["scale"] == 0.5  # 1 / sqrt(4)
    torch.testing.assert_close(s["scaled"], s["scores"] / 2)
    assert bool(s["mask"].any()) == causal
    torch.testing.assert_close(s["weights"].sum(-1), torch.ones(2, T))
    torch.testing.assert_close(s["context"], s["weights"] @ s["V"])
    assert s["output"].shape == (T, 8)
    torch.testing.assert_close(s["output"][:, 4:], s["context"][1])
    # The step-by-step dict and the one-call teaching function agree.
    context, weights = att.scaled_dot_product_attention(s["Q"], s["K"], s["V"], causal=causal)
    torch.testing.assert_close(weights, s["weights"])
    torch.testing.assert_close(context, s["context"])


def test_worked_example_seed_repeated_words_and_dropout():
    a = att.attention_steps(seed=1)
    assert torch.equal(a["weights"], att.attention_steps(seed=1)["weights"])
    assert not torch.equal(a["X"], att.attention_steps(seed=2)["X"])
    # Changing only the head size leaves the embeddings alone.
    assert torch.equal(a["X"], att.attention_steps(seed=1, d_head=2)["X"])
    s = att.attention_steps("the cat saw the dog", seed=0)
    assert torch.equal(s["X"][0], s["X"][3])  # the same word, the same vector
    d = att.attention_steps(seed=0, dropout_p=0.5)
    assert (d["dropped"] == 0).any() and not torch.equal(d["dropped"], d["weights"])
    assert torch.equal(d["dropped"], att.attention_steps(seed=0, dropout_p=0.5)["dropped"])


@pytest.mark.parametrize("text", ["", "   ", " ".join(["w"] * 100)])
def test_worked_example_rejects_unusable_text(text):
    with pytest.raises(GlassBoxError):
        att.attention_steps(text)


def test_entropy_in_bits():
    uniform = torch.full((4, 4), 0.25)
    one_hot = torch.eye(4)
    torch.testing.assert_close(att.attention_entropy(uniform), torch.full((4,), 2.0))
    torch.testing.assert_close(att.attention_entropy(one_hot), torch.zeros(4))


def test_head_summary_names_the_habit():
    T = 6
    previous = torch.zeros(T, T)
    previous[0, 0] = 1
    previous[torch.arange(1, T), torch.arange(T - 1)] = 1
    spread = torch.tril(torch.ones(T, T))
    spread = spread / spread.sum(-1, keepdim=True)
    first = torch.zeros(T, T)
    first[:, 0] = 1
    maps = torch.stack([torch.stack([previous, spread, torch.eye(T), first])])  # (1, 4, T, T)
    rows = att.head_summary(maps, causal=True)
    assert [r["looks_at"] for r in rows] == ["the previous token", "spread out", "itself", "the first token"]
    assert rows[0]["focus"] == pytest.approx(1.0) and rows[1]["focus"] == pytest.approx(0.0, abs=1e-6)
    assert rows[1]["entropy_bits"] == pytest.approx(sum(math.log2(n) for n in range(1, T + 1)) / T, rel=1e-5)


def cli_args(*argv):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser, cmd.Settings)
    return cmd, cli.settings_from_args(cmd.Settings, parser.parse_args(list(argv)))


def test_command_returns_tokens_and_weights(capsys):
    cmd, args = cli_args("--text", "a b c a", "--heads", "2", "--causal", "--seed", "3", "--dim", "2")
    result = cmd.run(args)
    json.dumps(result)  # must be JSON-able
    assert result["tokens"] == ["a", "b", "c", "a"]
    w = torch.tensor(result["weights"])
    assert w.shape == (2, 4, 4)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4), atol=1e-3, rtol=0)
    assert torch.all(w[:, att.causal_mask(4)] == 0)
    err = capsys.readouterr().err
    for name in ("Q", "K", "V", "scores", "weights"):
        assert name in err
    assert "journey" not in err and "a" in err


def test_command_rejects_bad_settings():
    cmd, args = cli_args("--text", "hello world", "--heads", "0")
    with pytest.raises(GlassBoxError):
        cmd.run(args)


@pytest.mark.skipif(not (REPO / "core" / "__main__.py").exists(), reason="core/__main__.py (lead) not written yet")
def test_command_line_end_to_end():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "core", "attention", "--text", "Your journey starts with one step"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(result["tokens"]) == 6 and len(result["weights"][0]) == 6
    assert "scores" in done.stderr
    bad = subprocess.run([sys.executable, "-m", "core", "attention", "--text", " "],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


def test_model_attention_maps_from_a_tiny_gpt():
    model_mod = pytest.importorskip("core.gpt.model", reason="core/model.py (stage 3 helper) not written yet")
    tokenizers = pytest.importorskip("core.gpt.tokenizers", reason="core/tokenizers.py not written yet")
    torch.manual_seed(0)
    tok = tokenizers.train_char("hello world, attention!")
    config = model_mod.GPTConfig(vocab_size=tok.vocab_size, context_length=8, n_embd=16, n_head=2, n_layer=2)
    model = model_mod.GPT(config)
    tokens, maps = att.model_attention_maps(model, tok, "hello world")
    assert tokens == list("hello wo")  # cut to the context length
    assert maps.shape == (2, 2, 8, 8)
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 2, 8), atol=1e-5, rtol=0)
    assert torch.all(maps[..., att.causal_mask(8)] == 0)
    assert len(att.head_summary(maps)) == 4
