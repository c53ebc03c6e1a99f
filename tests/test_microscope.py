"""The microscope's textbook functions (core/gpt/microscope.py): distributions, per-token loss,
logit lens and the visible KV cache, checked against the model's own forward pass and generate."""

import math

import pytest
import torch
import torch.nn.functional as F

from core.gpt import microscope as m
from core.gpt.errors import GlassBoxError, ModelConfigError
from core.gpt.model import GPT, GPTConfig, preset_config
from core.lab.bench_microscope import bench_model
from core.lab.gpt2 import save_hf_gpt2

SETTINGS = [  # (temperature, top_k, top_p)
    (1.0, None, None), (0.7, None, None), (1.8, 5, None), (1.0, None, 0.5), (0.5, 10, 0.9),
    (0.0, None, None), (1.0, 1, None), (1.0, None, 1e-6), (2.0, 3, 1.0),
]


MODERN = dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False)  # a Llama-style block


@pytest.fixture(scope="module", params=["gpt2-block", "modern-block"])
def model(request):
    """The tiny preset with GPT-2's block, and with the modern one (RoPE, RMSNorm, SwiGLU, GQA)."""
    torch.manual_seed(0)
    return GPT(preset_config("tiny", 97, **(MODERN if request.param == "modern-block" else {}))).eval()


@pytest.fixture(scope="module")
def short_model():
    """A model with only 12 positions, so generation slides past its context."""
    torch.manual_seed(1)
    return GPT(GPTConfig(vocab_size=31, context_length=12, n_embd=32, n_head=4, n_layer=2, **MODERN)).eval()


def spiky_logits(seed: int, vocab: int = 97):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=g) * 3


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_every_distribution_sums_to_one(temperature, top_k, top_p):
    for seed in range(5):
        raw, tempered, kept = m.three_distributions(spiky_logits(seed), temperature, top_k, top_p)
        for p in (raw, tempered, kept):
            assert p.shape == (97,)
            assert float(p.min()) >= 0
            assert float(p.sum()) == pytest.approx(1.0, abs=1e-5)
        # truncation only removes tokens: what is kept is a subset of what temperature allowed
        assert bool(((kept > 0) <= (tempered > 0)).all())


def test_raw_is_the_softmax_and_temperature_divides_the_scores():
    logits = spiky_logits(7)
    raw, tempered, _ = m.three_distributions(logits, 0.5)
    assert torch.allclose(raw, torch.softmax(logits, -1), atol=1e-7)
    assert torch.allclose(tempered, torch.softmax(logits * 2, -1), atol=1e-6)
    assert float(tempered.max()) > float(raw.max())  # T < 1 sharpens


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.5, 0.8, 0.95, 0.999])
@pytest.mark.parametrize("temperature", [0.6, 1.0, 1.5])
def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p(top_p, temperature):
    for seed in range(6):
        logits = spiky_logits(seed)
        _, tempered, kept = m.three_distributions(logits, temperature, None, top_p)
        mass = torch.sort(tempered, descending=True).values.cumsum(0)
        n_kept = int((kept > 0).sum())
        assert float(mass[n_kept - 1]) >= top_p - 1e-6  # the kept set reaches p ...
        if n_kept > 1:
            assert float(mass[n_kept - 2]) < top_p  # ... and one token fewer would not
        # the kept tokens are the most likely ones, renormalised in proportion
        top = torch.topk(tempered, n_kept).indices
        assert set(top.tolist()) == set(torch.nonzero(kept).flatten().tolist())
        assert torch.allclose(kept[top], tempered[top] / tempered[top].sum(), atol=1e-6)


def test_top_k_keeps_exactly_k_tokens():
    _, _, kept = m.three_distributions(spiky_logits(3), 1.0, 7, None)
    assert int((kept > 0).sum()) == 7


def test_entropy_and_rank():
    V = 64
    assert m.entropy_bits(torch.full((V,), 1 / V)) == pytest.approx(math.log2(V), abs=1e-5)
    assert m.entropy_bits(F.one_hot(torch.tensor(3), V).float()) == 0.0
    p = torch.tensor([0.1, 0.5, 0.3, 0.1])
    assert [m.rank_of(p, i) for i in range(4)] == [3, 1, 2, 3]


def test_temperature_zero_is_greedy_decoding(model):
    prompt = [5, 17, 42]
    greedy = model.generate(torch.tensor([prompt]), 15, temperature=0)[0].tolist()
    gen = m.generate_steps(model, prompt, 15, temperature=0)
    assert gen.ids == greedy
    for step in gen.steps:
        assert step.rank == 1
        assert float(step.kept.max()) == 1.0 and int((step.kept > 0).sum()) == 1
    # and as temperature goes to 0, sampling becomes greedy
    cold = m.generate_steps(model, prompt, 15, temperature=1e-4, generator=torch.Generator().manual_seed(0))
    assert cold.ids == greedy
    assert float(cold.steps[0].tempered.max()) > 0.999


def test_sampled_tokens_lie_in_the_kept_set(model):
    gen = m.generate_steps(model, [1, 2], 25, temperature=1.5, top_k=4, top_p=0.9,
                           generator=torch.Generator().manual_seed(3))
    assert len(gen.steps) == 25 and len(gen.ids) == 27
    for step in gen.steps:
        assert float(step.kept[step.token_id]) > 0
        assert step.rank <= 4


def test_a_forced_token_is_the_next_token_of_the_continued_text(model):
    prompt = [3, 4, 5]
    free = m.generate_steps(model, prompt, 3, temperature=0)
    branch_token = int(torch.argsort(free.steps[1].raw, descending=True)[5])  # the 6th favourite
    forced = [free.steps[0].token_id, branch_token]
    gen = m.generate_steps(model, prompt, 6, temperature=0, forced=forced)
    assert gen.ids[:5] == prompt + forced
    assert [s.forced for s in gen.steps] == [True, True, False, False, False, False]
    assert gen.steps[1].rank == 6
    # the step after the branch is the model's answer to the continued text, computed afresh
    expected = torch.softmax(model(torch.tensor([prompt + forced]))[0][0, -1], -1)
    assert torch.allclose(gen.steps[2].raw, expected, atol=1e-5)
    assert gen.ids[5] == int(expected.argmax())


@pytest.mark.parametrize("settings", [(0.0, None, None), (0.9, 8, 0.8)])
def test_cached_and_uncached_steps_give_the_same_distributions(short_model, settings):
    temperature, top_k, top_p = settings
    prompt = [1, 2, 3, 4]
    cached = m.generate_steps(short_model, prompt, 20, temperature, top_k, top_p,
                              generator=torch.Generator().manual_seed(0), use_cache=True)
    plain = m.generate_steps(short_model, prompt, 20, temperature, top_k, top_p,
                             forced=cached.ids[len(prompt):], use_cache=False)
    assert plain.ids == cached.ids  # 24 tokens: the window slid past the 12-position context
    for a, b in zip(cached.steps, plain.steps):
        for p, q in ((a.raw, b.raw), (a.tempered, b.tempered), (a.kept, b.kept)):
            assert torch.allclose(p, q, atol=1e-5)


def test_the_cache_holds_every_token_but_the_newest(model):
    gen = m.generate_steps(model, [1, 2, 3, 4, 5], 6, temperature=0)
    cfg = model.config
    assert gen.cache.length == len(gen.ids) - 1  # the newest token is fed at the next step
    n = gen.cache.length
    kv_heads = cfg.n_kv_head or cfg.n_head  # grouped-query attention stores fewer heads
    assert m.kv_cache_bytes(gen.cache) == 2 * cfg.n_layer * kv_heads * n * cfg.head_size * 4
    layout = m.kv_cache_layout(gen.cache)
    assert len(layout) == cfg.n_layer
    assert layout[0]["keys"] == [1, kv_heads, n, cfg.head_size]
    assert sum(row["bytes"] for row in layout) == m.kv_cache_bytes(gen.cache)
    assert m.generate_steps(model, [1], 2, use_cache=False).cache is None


def test_seconds_per_token_runs_both_ways(model):
    assert m.seconds_per_token(model, [1, 2, 3], 3, use_cache=True) > 0
    assert m.seconds_per_token(model, [1, 2, 3], 3, use_cache=False) > 0


@torch.no_grad()
def test_mean_per_token_loss_equals_the_forward_loss(model):
    ids = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(5)).tolist()
    losses = m.per_token_loss(model, ids)
    assert losses.shape == (39,)
    idx = torch.tensor([ids])
    _, loss = model(idx[:, :-1], targets=idx[:, 1:])
    assert float(losses.mean()) == pytest.approx(float(loss), abs=1e-5)
    # each loss is -log of the probability the model gave the real token, computed independently
    for t in (0, 17, 38):
        p = torch.softmax(model(idx[:, : t + 1])[0][0, -1], -1)[ids[t + 1]]
        assert float(losses[t]) == pytest.approx(-math.log(float(p)), abs=1e-4)


def test_surprise_gives_the_real_tokens_probability_and_top_alternatives(model):
    ids = [4, 8, 15, 16, 23, 42]
    s = m.surprise(model, ids, 5)
    assert torch.allclose(s["losses"], m.per_token_loss(model, ids), atol=1e-5)
    assert torch.allclose(s["p_real"], torch.exp(-s["losses"]), atol=1e-6)
    assert s["top_ids"].shape == (5, 5)
    assert bool((s["top_probs"][:, :-1] >= s["top_probs"][:, 1:]).all())  # best first


def test_logit_lens_at_the_last_layer_is_the_models_own_prediction(model):
    ids = list(range(3, 40))
    logits = model(torch.tensor([ids]))[0][0]
    assert torch.allclose(m.lens_logits(model, ids, -1), logits, atol=1e-5)
    lens = m.logit_lens(model, ids, top=3)
    assert lens["top_ids"].shape == (model.config.n_layer + 1, len(ids), 3)
    probs = torch.softmax(logits, -1)
    assert lens["top_ids"][-1, :, 0].tolist() == probs.argmax(-1).tolist()
    assert torch.allclose(lens["top_probs"][-1, :, 0], probs.max(-1).values, atol=1e-5)


def test_the_residual_stream_adds_one_snapshot_per_block(model):
    idx = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        stream = model.residual_stream(idx)
    assert len(stream) == model.config.n_layer + 1
    assert all(x.shape == (1, 3, model.config.n_embd) for x in stream)
    with torch.inference_mode():
        assert torch.allclose(model.ln_f(stream[-1]), model.hidden_states(idx), atol=1e-6)


def test_bad_input_is_a_clear_error(model):
    for temperature, top_k, top_p, words in [(-0.5, None, None, "Temperature"), (1.0, 0, None, "top-k"),
                                             (1.0, None, 0.0, "top-p"), (1.0, None, 1.5, "top-p")]:
        with pytest.raises(ModelConfigError, match=words):
            m.three_distributions(spiky_logits(0), temperature, top_k, top_p)
        with pytest.raises(ModelConfigError, match=words):
            m.generate_steps(model, [1], 1, temperature, top_k, top_p)
    with pytest.raises(GlassBoxError, match="empty"):
        m.generate_steps(model, [], 3)
    with pytest.raises(GlassBoxError, match="two tokens"):
        m.per_token_loss(model, [1])
    with pytest.raises(GlassBoxError, match="two tokens"):
        m.surprise(model, [1])
    with pytest.raises(GlassBoxError, match="at least one token"):
        m.logit_lens(model, [])


def test_forced_steps_scored_in_one_pass_equal_step_by_step_scores(model):
    prompt = [9, 8, 7]
    free = m.generate_steps(model, prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(2))
    forced = free.ids[len(prompt):]
    taught = m.forced_logits(model, prompt, forced)
    assert taught.shape == (12, 97)
    for n, step in enumerate(free.steps):  # the free run computed these one cached step at a time
        assert torch.allclose(torch.softmax(taught[n], -1), step.raw, atol=1e-5)
    replay = m.generate_steps(model, prompt, 15, temperature=0, forced=forced)
    assert replay.ids[: len(prompt) + 12] == free.ids
    # after the forced tokens the cache takes over: the next token is greedy on the whole text
    with torch.no_grad():
        assert replay.ids[len(prompt) + 12] == int(model(torch.tensor([free.ids]))[0][0, -1].argmax())
    assert replay.cache.length == len(replay.ids) - 1


def test_the_latency_bench_reports_every_view():
    figures = bench_model("tiny", 100, repeats=1)
    for view in ("step", "step_uncached", "surprise", "lens", "attention_maps", "panel_rerun"):
        assert figures[f"{view}_s"] > 0
    assert figures["parameters"] == GPT(preset_config("tiny", 100)).num_parameters()
    assert isinstance(figures["within_targets"], bool)


def test_per_token_loss_and_the_lens_agree_with_transformers(tmp_path):
    """An independent reference: the same GPT-2-shaped weights in Hugging Face's GPT2LMHeadModel.
    Its hidden_states[i] (i < L) is the residual after block i - 1; the last one already has ln_f."""
    transformers = pytest.importorskip("transformers")

    torch.manual_seed(3)
    ours = GPT(preset_config("tiny", 97, qkv_bias=True, gelu="tanh")).eval()
    hf = transformers.GPT2LMHeadModel.from_pretrained(save_hf_gpt2(ours, tmp_path / "hf")).eval()
    ids = torch.randint(0, 97, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    with torch.no_grad():
        out = hf(torch.tensor([ids]), output_hidden_states=True)
        hf_losses = F.cross_entropy(out.logits[0, :-1], torch.tensor(ids[1:]), reduction="none")
        assert torch.allclose(m.per_token_loss(ours, ids), hf_losses, atol=1e-4)
        lens = m.logit_lens(ours, ids)
        for layer, hidden in enumerate(out.hidden_states[:-1]):
            probs = torch.softmax(hf.lm_head(hf.transformer.ln_f(hidden))[0], -1)
            assert lens["top_ids"][layer, :, 0].tolist() == probs.argmax(-1).tolist()
            assert torch.allclose(lens["top_probs"][layer, :, 0], probs.max(-1).values, atol=1e-4)
