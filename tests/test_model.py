"""Stage 3: the GPT model — shapes, counts, the two attention paths, generation and the KV cache."""

import json

import pytest
import torch

from core.lab import runs
from core.gpt.errors import ModelConfigError
from core.lab.errors import CorruptRunError
from core.gpt.model import GPT, PRESETS, GPTConfig, count_parameters, filtered_probabilities, preset_config
from core.lab.models import generation_threads, load_model_run, save_model_run


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny(**overrides) -> GPTConfig:
    values = dict(vocab_size=50, context_length=16, n_embd=32, n_head=4, n_layer=2)
    values.update(overrides)
    return GPTConfig(**values)


def model_of(config: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(config).eval()


def ids(batch=2, length=10, vocab=50, seed=1):
    return torch.randint(vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("bad, words", [
    (dict(n_embd=30, n_head=4), "divide evenly"),
    (dict(n_layer=0), "at least one transformer block"),
    (dict(n_head=0), "at least one head"),
    (dict(vocab_size=0), "vocabulary"),
    (dict(context_length=0), "context_length"),
    (dict(dropout=1.5), "dropout"),
    (dict(attention="quick"), "attention"),
    (dict(gelu="relu"), "gelu must be"),
    (dict(n_embd=32.5), "whole number"),
])
def test_bad_configs_say_what_is_wrong(bad, words):
    with pytest.raises(ModelConfigError, match=words):
        tiny(**bad)


def test_config_round_trips_through_json():
    config = tiny(dropout=0.1, qkv_bias=True, tie_weights=False, attention="teaching")
    again = GPTConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    with pytest.raises(ModelConfigError, match="lacks n_layer"):
        GPTConfig.from_dict({"vocab_size": 5, "context_length": 4, "n_embd": 8, "n_head": 2})


def test_models_trained_here_use_exact_gelu_and_old_runs_keep_gpt2s_tanh():
    assert preset_config("small", 65).gelu == "exact"
    assert preset_config("gpt2-124m").gelu == "tanh"
    assert model_of(tiny()).blocks[0].mlp.gelu.approximate == "none"
    assert model_of(tiny(gelu="tanh")).blocks[0].mlp.gelu.approximate == "tanh"
    # A config.json written before the choice existed: those models were trained with tanh.
    legacy = {"vocab_size": 5, "context_length": 4, "n_embd": 8, "n_head": 2, "n_layer": 1}
    assert GPTConfig.from_dict(legacy).gelu == "tanh"
    # The two differ, slightly: max |exact - tanh| is about 5e-4 on [-4, 4].
    x = torch.linspace(-4, 4, 801)
    gap = (torch.nn.functional.gelu(x) - torch.nn.functional.gelu(x, approximate="tanh")).abs().max()
    assert 1e-5 < gap < 1e-3


def test_presets_build_and_gpt2_matches_the_published_size():
    assert set(PRESETS) >= {"tiny", "small", "base", "gpt2-124m", "gpt2-355m"}
    small = preset_config("small", 65)
    # small: wider and shallower than nanoGPT's CPU shape (4 × 128): learns as fast, uses the CPU better
    assert (small.n_layer, small.n_embd, small.n_head, small.context_length) == (2, 192, 6, 64)
    base = preset_config("base", 1000)
    assert base.context_length >= 256  # the start of stages 5 and 6 needs room for a prompt
    # GPT-2 "124M": 124,439,808 parameters with the tied head; 355M: 354,823,168.
    assert sum(count_parameters(preset_config("gpt2-124m")).values()) == 124_439_808
    assert sum(count_parameters(preset_config("gpt2-355m")).values()) == 354_823_168
    with pytest.raises(ModelConfigError, match="Unknown preset"):
        preset_config("huge", 100)
    with pytest.raises(ModelConfigError, match="vocabulary size"):
        preset_config("tiny")


@pytest.mark.parametrize("overrides", [dict(), dict(qkv_bias=True, tie_weights=False)])
def test_parameter_arithmetic_matches_the_real_model(overrides):
    config = tiny(**overrides)
    model = model_of(config)
    counted = count_parameters(config)
    assert model.parameter_breakdown() == counted
    assert model.num_parameters() == sum(counted.values()) == sum(p.numel() for p in model.parameters())
    if config.tie_weights:
        assert model.lm_head.weight is model.wte.weight
        assert counted["output head"] == 0


def test_flops_per_token_is_nanogpts_estimate():
    model = model_of(preset_config("small", 65))
    n = model.num_parameters() - model.wpe.weight.numel()  # nanoGPT: non-embedding, tied head kept
    L, H, Q, T = model.config.n_layer, model.config.n_head, 192 // 6, 64
    assert model.flops_per_token() == 6 * n + 12 * L * H * Q * T
    # nanoGPT's CPU shape (4 blocks × 128) is ≈ 5.2 MFLOP/token, as in the speed issue
    four_blocks = model_of(preset_config("small", 65, n_layer=4, n_embd=128, n_head=4))
    assert 5.0e6 < four_blocks.flops_per_token() < 5.4e6


# ---------------------------------------------------------------------------- forward


def test_forward_shapes_and_loss_at_init_is_near_uniform():
    model = model_of(tiny())
    x = ids()
    logits, loss = model(x)
    assert logits.shape == (2, 10, 50) and loss is None
    logits, loss = model(x, targets=ids(seed=2))
    # An untrained model spreads its bets: the loss is close to log(vocabulary).
    assert abs(loss.item() - torch.log(torch.tensor(50.0)).item()) < 0.3
    assert model.hidden_states(x).shape == (2, 10, 32)


def test_ignore_index_leaves_positions_out_of_the_loss():
    model = model_of(tiny())
    x = ids()
    targets = x.clone()
    targets[:, 5:] = -100
    _, partial = model(x, targets)
    logits, _ = model(x)
    expected = torch.nn.functional.cross_entropy(logits[:, :5].reshape(-1, 50), x[:, :5].reshape(-1))
    assert torch.allclose(partial, expected, atol=1e-6)


def test_input_too_long_or_outside_the_vocabulary_is_a_clear_error():
    model = model_of(tiny())
    with pytest.raises(ModelConfigError, match="17 tokens but the model's context length is 16"):
        model(ids(length=17))
    with pytest.raises(ModelConfigError, match="outside the model's vocabulary"):
        model(torch.tensor([[3, 50]]))


def test_the_model_is_causal_future_tokens_do_not_change_the_past():
    model = model_of(tiny())
    x = ids(batch=1)
    y = x.clone()
    y[0, 7:] = (y[0, 7:] + 1) % 50
    a, _ = model(x)
    b, _ = model(y)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-5)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-3)


@pytest.mark.parametrize("gelu", ["exact", "tanh"])
def test_teaching_path_computes_the_same_numbers_as_the_fast_path(gelu):
    model = model_of(tiny(qkv_bias=True, gelu=gelu))
    for p in model.parameters():  # move away from the init so biases and norms matter
        p.data.add_(torch.randn_like(p) * 0.05)
    x = ids()
    fast, fast_loss = model(x, x)
    model.set_attention("teaching")
    teaching, teaching_loss = model(x, x)
    assert torch.allclose(fast, teaching, atol=1e-5)
    assert abs(fast_loss.item() - teaching_loss.item()) < 1e-5
    # Gradients flow through the teaching path too.
    model.train()
    model(x, x)[1].backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ModelConfigError):
        model.set_attention("slow")


def test_attention_maps_are_causal_probability_rows():
    model = model_of(tiny())
    maps = model.attention_maps(ids(batch=1, length=6))
    assert maps.shape == (2, 4, 6, 6)
    assert torch.allclose(maps.sum(-1), torch.ones(2, 4, 6), atol=1e-5)
    assert torch.all(maps.triu(diagonal=1) == 0)  # no token looks at the future


def test_forward_trace_lists_every_module_in_order_with_shapes_and_bytes():
    model = model_of(tiny())
    trace = model.forward_trace(ids(batch=1, length=5))
    names = [row["module"] for row in trace]
    assert names[:3] == ["wte", "wpe", "blocks.0"]
    assert names[-2:] == ["ln_f", "lm_head"]
    assert names.index("blocks.0.attn") < names.index("blocks.0.mlp") < names.index("blocks.1")
    shapes = {row["module"]: row["output_shape"] for row in trace}
    assert shapes["blocks.0.attn.qkv"] == [1, 5, 96]
    assert shapes["blocks.1.mlp.fc"] == [1, 5, 128]
    assert shapes["lm_head"] == [1, 5, 50]
    rows = {row["module"]: row for row in trace}
    assert rows["blocks.0"]["parameters"] == sum(p.numel() for p in model.blocks[0].parameters())
    assert rows["blocks.0"]["bytes_fp32"] == 4 * rows["blocks.0"]["parameters"]
    assert rows["lm_head"]["bytes_fp32"] == 0 and "tied" in rows["lm_head"]["note"]


# ---------------------------------------------------------------------------- generation


@pytest.mark.parametrize("path", ["fast", "teaching"])
def test_greedy_generation_is_identical_with_and_without_the_kv_cache(path):
    model = model_of(tiny(attention=path), seed=3)
    for p in model.parameters():  # a random model repeats one token; a perturbed one varies
        p.data.add_(torch.randn_like(p) * 0.3)
    prompt = ids(batch=2, length=3)
    cached = model.generate(prompt, 12, temperature=0, use_cache=True)
    plain = model.generate(prompt, 12, temperature=0, use_cache=False)
    assert cached.shape == (2, 15)
    assert torch.equal(cached[:, :3], prompt)
    assert torch.equal(cached, plain)
    assert len(set(cached[0, 3:].tolist())) > 1
    # Past the context length (16) the window slides; output still matches.
    long_cached = model.generate(prompt, 30, temperature=0, use_cache=True)
    assert torch.equal(long_cached, model.generate(prompt, 30, temperature=0, use_cache=False))


def test_cached_logits_equal_full_forward_logits():
    model = model_of(tiny())
    x = ids(batch=1, length=8)
    from core.gpt.model import KVCache

    cache = KVCache(model.config, 1, "cpu", torch.float32)
    with torch.no_grad():
        first = model._last_logits(x[:, :5], cache)
        step = [model._last_logits(x[:, i:i + 1], cache) for i in range(5, 8)]
        full, _ = model(x)
    assert torch.allclose(first, full[:, 4], atol=1e-5)
    for i, logits in zip(range(5, 8), step):
        assert torch.allclose(logits, full[:, i], atol=1e-5)


def test_sampling_is_reproducible_with_a_generator_and_stops_at_eos():
    model = model_of(tiny())
    prompt = ids(batch=1, length=2)
    a = model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    b = model.generate(prompt, 10, temperature=1.0, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    greedy = model.generate(prompt, 5, temperature=0)
    eos = int(greedy[0, 2])  # the first greedy token: generation must stop right after it
    stopped = model.generate(prompt, 10, temperature=0, eos_id=eos)
    assert stopped.tolist() == greedy[:, :3].tolist()
    one_dim = model.generate(prompt[0], 3, temperature=0)
    assert one_dim.shape == (5,)


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    assert (filtered_probabilities(logits, top_k=2) > 0).sum() == 2
    probs = torch.softmax(logits, -1)  # ≈ 0.64, 0.23, 0.09, 0.03, 0.01
    kept = filtered_probabilities(logits, top_p=0.8) > 0
    assert kept.tolist() == [True, True, False, False, False]
    assert filtered_probabilities(logits, top_p=0.5).argmax() == 0
    assert (filtered_probabilities(logits, top_p=0.5) > 0).sum() == 1
    assert filtered_probabilities(logits, temperature=0).tolist() == [1.0, 0, 0, 0, 0]
    hot = filtered_probabilities(logits, temperature=2.0)
    assert hot.max() < probs.max()  # a higher temperature flattens the distribution
    model = model_of(tiny())
    dist = model.next_token_distribution(ids(batch=1, length=4), temperature=0.7, top_k=5)
    assert dist.shape == (50,) and (dist > 0).sum() == 5 and abs(dist.sum().item() - 1) < 1e-5
    with pytest.raises(ModelConfigError, match="Temperature"):
        model.generate(ids(batch=1, length=2), 3, temperature=-1)
    with pytest.raises(ModelConfigError, match="top-p"):
        model.generate(ids(batch=1, length=2), 3, top_p=1.5)


# ---------------------------------------------------------------------------- runs on disk


def _tokenizer():
    from core.gpt.tokenizers import train_char

    return train_char("abcdefghijklmnopqrstuvwxyz .,")  # fewer ids than the model's 50


def test_save_and_load_a_model_run_round_trips_weights_and_config():
    model = model_of(tiny(qkv_bias=True))
    runs.create_run("m1", "pretrain", {"note": "test"})
    save_model_run("m1", model, _tokenizer())
    config = runs.read_json(runs.run_dir("m1") / "config.json")
    assert config["model"]["n_embd"] == 32 and config["note"] == "test"
    loaded, tokenizer, run_config = load_model_run("m1")
    assert tokenizer.encode("hello") and run_config["stage"] == "pretrain"
    assert loaded.lm_head.weight is loaded.wte.weight
    x = ids()
    assert torch.equal(model(x)[0], loaded(x)[0])


def test_a_run_with_missing_or_misshapen_tensors_names_the_tensor():
    from core.lab.models import model_tensors

    model = model_of(tiny())
    runs.create_run("m2", "pretrain", {})
    save_model_run("m2", model, _tokenizer())
    path = runs.run_dir("m2") / "model.safetensors"
    tensors = model_tensors(model)
    del tensors["blocks.1.mlp.fc.bias"]
    runs.save_tensors(path, tensors)
    with pytest.raises(CorruptRunError, match="blocks.1.mlp.fc.bias"):
        load_model_run("m2")
    tensors = model_tensors(model)
    tensors["ln_f.weight"] = torch.ones(7)
    runs.save_tensors(path, tensors)
    with pytest.raises(CorruptRunError, match=r"ln_f.weight has shape \(7,\)"):
        load_model_run("m2")
    runs.create_run("m3", "pretrain", {})
    with pytest.raises(CorruptRunError, match="holds no model"):
        load_model_run("m3")


def test_generation_leaves_the_thread_count_as_it_found_it():
    model = model_of(tiny())
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with generation_threads(model):  # decodes on one thread, then restores
            assert torch.get_num_threads() == 1
            model.generate(ids(batch=1, length=2), 20, temperature=0)
        assert torch.get_num_threads() == 2
        with pytest.raises(ModelConfigError):
            with generation_threads(model):
                model.generate(ids(batch=1, length=2), 3, temperature=-1)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
