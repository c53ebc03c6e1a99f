"""The modern block (issue 18 part 1): RoPE, RMSNorm, SwiGLU, grouped-query attention, no biases.

Each option is checked against an independent reference: the teaching path written from the
formulas, a rotation built by hand, multi-head attention with the key/value heads copied out, the
uncached forward, and Hugging Face's own `LlamaForCausalLM`.
"""

import itertools
import math

import pytest
import torch

from core.gpt.errors import ModelConfigError
from core.gpt.generate import KVCache
from core.gpt.model import GPT, GPTConfig, count_parameters, preset_config
from core.gpt.rope import apply_rope, relative_position_scores, rope_cos_sin, rotate_half
from core.gpt.sizes import flops_per_token, kv_cache_bytes_per_token


def config(**overrides) -> GPTConfig:
    values = dict(vocab_size=61, context_length=16, n_embd=32, n_head=4, n_layer=2)
    values.update(overrides)
    return GPTConfig(**values)


def perturbed(cfg: GPTConfig, seed: int = 0, scale: float = 0.05) -> GPT:
    """A model moved away from its init, so that biases, norm weights and gates all matter."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def ids(batch=2, length=10, vocab=61, seed=1):
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


MODERN = dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, ffn_hidden=48, bias=False)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


COMBINATIONS = list(itertools.product(["learned", "rope"], ["layernorm", "rmsnorm"], ["gelu", "swiglu"],
                                      [None, 2, 1], [True, False]))


# ---------------------------------------------------------------------------- fast = teaching


@pytest.mark.parametrize("position, norm, mlp, n_kv_head, bias", COMBINATIONS)
def test_teaching_and_fast_paths_agree_for_every_option(position, norm, mlp, n_kv_head, bias):
    cfg = config(position=position, norm=norm, mlp=mlp, n_kv_head=n_kv_head, bias=bias, qkv_bias=bias)
    model = perturbed(cfg)
    x = ids()
    fast, fast_loss = model(x, x)
    model.set_attention("teaching")
    teaching, teaching_loss = model(x, x)
    assert torch.allclose(fast, teaching, atol=1e-5), (fast - teaching).abs().max()
    assert abs(fast_loss.item() - teaching_loss.item()) < 1e-5
    # the parameter arithmetic matches the real tensors for this combination too
    counted = count_parameters(cfg)
    assert model.parameter_breakdown() == counted
    assert sum(counted.values()) == sum(p.numel() for p in model.parameters())


def test_the_options_really_change_the_modules():
    model = GPT(config(**MODERN))
    block = model.blocks[0]
    assert model.wpe is None and "wpe.weight" not in model.state_dict()
    assert type(block.ln_1).__name__ == "RMSNorm" and getattr(block.ln_1, "bias", None) is None
    assert block.mlp.fc.weight.shape == (2 * 48, 32) and block.mlp.proj.weight.shape == (32, 48)
    hs = 32 // 4
    assert block.attn.qkv.weight.shape == ((4 + 2 * 2) * hs, 32)  # [q: 4 heads; k: 2; v: 2]
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Linear))
    gpt2 = GPT(config())
    assert gpt2.blocks[0].mlp.fc.weight.shape == (128, 32) and gpt2.blocks[0].ln_1.bias is not None


# ---------------------------------------------------------------------------- RoPE


def test_rope_rotates_each_pair_i_with_i_plus_half_by_position_times_theta():
    hs, base = 8, 10000.0
    x = torch.randn(5, hs, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_cos_sin(5, hs, base)
    rotated = apply_rope(x, cos, sin)
    for m in range(5):
        for i in range(hs // 2):
            angle = m * base ** (-2 * i / hs)
            a, b = x[m, i].item(), x[m, i + hs // 2].item()
            assert rotated[m, i].item() == pytest.approx(a * math.cos(angle) - b * math.sin(angle), abs=1e-5)
            assert rotated[m, i + hs // 2].item() == pytest.approx(a * math.sin(angle) + b * math.cos(angle), abs=1e-5)
    # a rotation keeps lengths; position 0 is not rotated at all
    assert torch.allclose(rotated.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    assert torch.allclose(rotated[0], x[0])
    assert torch.equal(rotate_half(torch.tensor([1.0, 2.0, 3.0, 4.0])), torch.tensor([-3.0, -4.0, 1.0, 2.0]))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rope_scores_depend_only_on_the_distance(seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(16, generator=g), torch.randn(16, generator=g)
    scores = relative_position_scores(q, k, n_positions=12)  # [m, n]: q at m, k at n
    for distance in range(-11, 12):
        diagonal = torch.diagonal(scores, offset=-distance)  # all (m, n) with m - n = distance
        assert torch.allclose(diagonal, diagonal[0].expand_as(diagonal), atol=1e-4)
    # ...and the distance matters: different distances give different scores
    by_distance = torch.stack([torch.diagonal(scores, offset=-d)[0] for d in range(12)])
    assert by_distance.std() > 0.01
    # without rotation every position would give the same score
    assert scores[0, 0].item() == pytest.approx((q @ k).item(), abs=1e-5)


def test_a_rope_model_is_shift_invariant_where_a_learned_one_is_not():
    """Relative positions in a whole model: the same keys and query at other absolute positions
    give the same attention scores in layer 0 (before anything else has mixed)."""
    model = perturbed(config(position="rope", n_layer=1))
    attn = model.blocks[0].attn
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(3))
    q, k, _ = attn.project(x)
    scores = []
    for start in (0, 5):
        cos, sin = rope_cos_sin(6, 8, start=start)
        scores.append(apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-2, -1))
    assert torch.allclose(scores[0], scores[1], atol=1e-4)


# ---------------------------------------------------------------------------- grouped-query attention


def test_n_kv_head_equal_to_n_head_is_plain_multi_head_attention():
    plain = perturbed(config(position="rope", norm="rmsnorm", mlp="swiglu"))
    explicit = GPT(config(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=4)).eval()
    explicit.load_state_dict(plain.state_dict())
    x = ids()
    assert torch.equal(plain(x)[0], explicit(x)[0])


@pytest.mark.parametrize("n_kv_head", [2, 1])
def test_grouped_query_attention_is_multi_head_with_shared_key_value_heads(n_kv_head):
    """Copy each key/value head to the query heads it serves: a plain multi-head model with those
    weights gives the same logits."""
    gqa = perturbed(config(n_kv_head=n_kv_head, qkv_bias=True))
    mha = GPT(config(qkv_bias=True)).eval()
    state = gqa.state_dict()
    hs, rep = 8, 4 // n_kv_head
    for i in range(2):
        for kind in ("weight", "bias"):
            q, k, v = state[f"blocks.{i}.attn.qkv.{kind}"].split([4 * hs, n_kv_head * hs, n_kv_head * hs])
            expand = lambda t: torch.cat([t[j * hs:(j + 1) * hs] for j in range(n_kv_head) for _ in range(rep)])
            state[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([q, expand(k), expand(v)])
    mha.load_state_dict(state)
    x = ids()
    assert torch.allclose(gqa(x)[0], mha(x)[0], atol=1e-5)
    assert torch.allclose(gqa.attention_maps(x[:1]), mha.attention_maps(x[:1]), atol=1e-6)


# ---------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("path", ["fast", "teaching"])
def test_cached_generation_of_the_modern_block_matches_recomputing(path):
    model = perturbed(config(attention=path, **MODERN), seed=3, scale=0.3)
    prompt = ids(batch=2, length=3)
    cached = model.generate(prompt, 12, temperature=0, use_cache=True)
    assert torch.equal(cached, model.generate(prompt, 12, temperature=0, use_cache=False))
    assert len(set(cached[0, 3:].tolist())) > 1
    long_cached = model.generate(prompt, 30, temperature=0, use_cache=True)  # past the context (16)
    assert torch.equal(long_cached, model.generate(prompt, 30, temperature=0, use_cache=False))


def test_one_token_at_a_time_through_the_cache_gives_the_full_forward_logits():
    model = perturbed(config(**MODERN))
    x = ids(batch=1, length=9)
    cache = KVCache(model.config, 1, "cpu", torch.float32)
    assert cache.keys[0].shape == (1, 2, 16, 8)  # only the 2 key/value heads are stored
    with torch.no_grad():
        full, _ = model(x)
        first, _ = model(x[:, :4], cache=cache)
        steps = [model(x[:, i:i + 1], cache=cache)[0] for i in range(4, 9)]
    assert cache.length == 9
    assert torch.allclose(first, full[:, :4], atol=1e-5)
    for i, logits in zip(range(4, 9), steps):
        assert torch.allclose(logits[:, 0], full[:, i], atol=1e-5)
    with pytest.raises(ModelConfigError, match="context length"):
        model(ids(batch=1, length=8), cache=cache)  # 9 + 8 > 16


def test_kv_cache_bytes_per_token_is_what_the_cache_holds():
    for cfg in (config(), config(**MODERN), config(n_kv_head=1)):
        cache = KVCache(cfg, 1, "cpu", torch.float32)
        held = sum(t.numel() * t.element_size() for t in cache.keys + cache.values)
        assert kv_cache_bytes_per_token(cfg) == held // cfg.context_length
    assert kv_cache_bytes_per_token(config(n_kv_head=1)) * 4 == kv_cache_bytes_per_token(config())


def test_flops_per_token_follows_the_parameters():
    cfg = config(**MODERN)
    model = GPT(cfg)
    n = model.num_parameters(non_embedding=True)
    assert flops_per_token(cfg) == model.flops_per_token() == 6 * n + 12 * 2 * 4 * 8 * 16


# ---------------------------------------------------------------------------- the residual stream


def test_residual_stream_has_one_snapshot_per_layer_and_ends_in_the_logits():
    model = perturbed(config(**MODERN))
    x = ids()
    stream = model.residual_stream(x)
    assert len(stream) == 3 and all(s.shape == (2, 10, 32) for s in stream)
    assert torch.allclose(stream[0], model.wte(x))  # RoPE adds nothing to the embeddings
    logits = model.lm_head(model.ln_f(stream[-1]))
    assert torch.allclose(logits, model(x)[0], atol=1e-6)
    assert torch.allclose(model.hidden_states(x), model.ln_f(stream[-1]), atol=1e-6)


# ---------------------------------------------------------------------------- configs


@pytest.mark.parametrize("bad, words", [
    (dict(n_kv_head=3), "must divide n_head"),
    (dict(n_kv_head=0), "must divide n_head"),
    (dict(n_kv_head=2.0), "whole number"),
    (dict(position="rope", n_embd=36, n_head=4), "even size"),
    (dict(position="alibi"), "position must be"),
    (dict(norm="batchnorm"), "norm must be"),
    (dict(mlp="relu"), "mlp must be"),
    (dict(ffn_hidden=0), "ffn_hidden"),
    (dict(rope_base=-1.0), "rope_base"),
    (dict(norm_eps=0), "norm_eps"),
    (dict(bias="no"), "bias must be"),
])
def test_bad_modern_options_say_what_is_wrong(bad, words):
    with pytest.raises(ModelConfigError, match=words):
        config(**bad)


def test_old_run_configs_load_as_gpt2_and_new_ones_round_trip():
    legacy = {"vocab_size": 5, "context_length": 4, "n_embd": 8, "n_head": 2, "n_layer": 1, "gelu": "exact"}
    old = GPTConfig.from_dict(legacy)
    assert (old.position, old.norm, old.mlp, old.n_kv_head, old.bias) == ("learned", "layernorm", "gelu", None, True)
    modern = preset_config("modern", 100)
    assert GPTConfig.from_dict(modern.to_dict()) == modern
    assert (modern.position, modern.norm, modern.mlp, modern.n_kv_head) == ("rope", "rmsnorm", "swiglu", 2)
    base = preset_config("base", 100)
    assert (modern.n_layer, modern.n_embd, modern.context_length) == (base.n_layer, base.n_embd, base.context_length)
    # SwiGLU's inner width keeps the feed-forward about as big as GELU's
    ff = count_parameters(modern)["feed-forward"] / count_parameters(base)["feed-forward"]
    assert 0.95 < ff < 1.05


# ---------------------------------------------------------------------------- Hugging Face Llama


def _llama_into_ours(hf, cfg: GPTConfig) -> GPT:
    """Copy a LlamaForCausalLM's weights into our GPT by hand (H6 writes the real importer)."""
    sd = hf.state_dict()
    ours = {"wte.weight": sd["model.embed_tokens.weight"], "ln_f.weight": sd["model.norm.weight"]}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        ours[f"blocks.{i}.ln_1.weight"] = sd[p + "input_layernorm.weight"]
        ours[f"blocks.{i}.ln_2.weight"] = sd[p + "post_attention_layernorm.weight"]
        ours[f"blocks.{i}.attn.qkv.weight"] = torch.cat(
            [sd[p + f"self_attn.{n}_proj.weight"] for n in ("q", "k", "v")])
        ours[f"blocks.{i}.attn.proj.weight"] = sd[p + "self_attn.o_proj.weight"]
        ours[f"blocks.{i}.mlp.fc.weight"] = torch.cat([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]])
        ours[f"blocks.{i}.mlp.proj.weight"] = sd[p + "mlp.down_proj.weight"]
    if not cfg.tie_weights:
        ours["lm_head.weight"] = sd["lm_head.weight"]
    model = GPT(cfg).eval()
    missing, unexpected = model.load_state_dict(ours, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


@pytest.mark.parametrize("tie, n_kv_head, path", [(True, 2, "fast"), (False, 1, "teaching"), (True, 4, "fast")])
def test_a_random_hugging_face_llama_gives_the_same_logits(tie, n_kv_head, path):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_head, max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=tie, attention_bias=False, mlp_bias=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_config).eval()
    with torch.no_grad():  # norms start at exactly 1: move them so a missed norm weight would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    cfg = GPTConfig(vocab_size=97, context_length=32, n_embd=64, n_head=4, n_layer=2, n_kv_head=n_kv_head,
                    ffn_hidden=96, position="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                    tie_weights=tie, attention=path)
    ours = _llama_into_ours(hf, cfg)
    x = ids(batch=2, length=20, vocab=97, seed=4)
    with torch.no_grad():
        expected = hf(x).logits
        got, _ = ours(x)
    assert (got - expected).abs().max().item() <= 1e-4
    assert torch.equal(ours.generate(x[:1, :5], 8, temperature=0),
                       hf.generate(x[:1, :5], max_new_tokens=8, do_sample=False, pad_token_id=0))
