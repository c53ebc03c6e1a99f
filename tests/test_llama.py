"""Llama weights in and out: our GPT with the modern block computes what transformers'
LlamaForCausalLM computes, in both directions, and a bad Llama folder is refused clearly.

`transformers` is a test-only dependency; nothing is downloaded (the models are random and small).
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from core.__main__ import run_command  # noqa: E402
from core.gpt.errors import GlassBoxError, ModelConfigError  # noqa: E402
from core.gpt.model import GPT, GPTConfig  # noqa: E402
from core.lab import runs  # noqa: E402
from core.lab.llama import LlamaFormatError, load_hf_llama, save_hf_llama  # noqa: E402
from core.lab.models import load_model_run, save_model_run  # noqa: E402
from core.lab.tokenizer_files import ByteLevelBPE  # noqa: E402
from core.stages.export import architecture_of  # noqa: E402
from core.gpt.tokenizers import train_bpe  # noqa: E402


def hf_llama(vocab=300, layers=2, hidden=64, heads=4, kv_heads=2, inter=96, tie=False, bias=False, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                         rope_theta=5000.0, rms_norm_eps=1e-5, tie_word_embeddings=tie, attention_bias=bias,
                         mlp_bias=bias, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # random norms (and biases) too, so every tensor's mapping is checked
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def sample_ids(vocab=300, length=24):
    return torch.randint(vocab, (2, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie, bias, kv_heads", [(False, False, 2), (True, False, 4), (False, True, 1)],
                         ids=["gqa", "tied-mha", "biases-mqa"])
def test_a_saved_llama_loads_into_our_gpt_with_equal_logits(tmp_path, tie, bias, kv_heads):
    hf = hf_llama(tie=tie, bias=bias, kv_heads=kv_heads)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_llama(tmp_path / "hf")
    cfg = ours.config
    assert (cfg.position, cfg.norm, cfg.mlp, cfg.n_kv_head, cfg.ffn_hidden) == ("rope", "rmsnorm", "swiglu", kv_heads, 96)
    assert cfg.rope_base == 5000.0 and cfg.tie_weights == tie and cfg.bias == bias and cfg.qkv_bias == bias
    x = sample_ids()
    with torch.no_grad():
        assert (ours(x)[0] - hf_logits(hf, x)).abs().max().item() < 1e-4
        ours.set_attention("teaching")
        assert (ours(x)[0] - hf_logits(hf, x)).abs().max().item() < 1e-4
    # and back out: transformers reads our folder with the same logits
    save_hf_llama(ours.set_attention("fast"), tmp_path / "back")
    again = LlamaForCausalLM.from_pretrained(tmp_path / "back").eval()
    assert (hf_logits(again, x) - hf_logits(hf, x)).abs().max().item() < 1e-4


def modern_gpt(vocab=300, seed=0, **overrides):
    torch.manual_seed(seed)
    values = dict(vocab_size=vocab, context_length=32, n_embd=64, n_head=4, n_layer=2, position="rope",
                  norm="rmsnorm", mlp="swiglu", n_kv_head=2, ffn_hidden=80, bias=False, rope_base=10000.0)
    model = GPT(GPTConfig(**{**values, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def test_our_modern_model_exports_to_llama_and_greedy_generation_agrees(tmp_path):
    ours = modern_gpt()
    save_hf_llama(ours, tmp_path / "out")
    hf_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert hf_config["model_type"] == "llama" and hf_config["num_key_value_heads"] == 2
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = sample_ids(length=20)
    with torch.no_grad():
        assert (ours(x)[0] - hf_logits(hf, x)).abs().max().item() < 1e-4
    prompt = x[:1, :5]
    hf_out = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ours.generate(prompt, 8, temperature=0).tolist() == hf_out.tolist()


def test_a_modern_model_with_some_biases_exports_zeros_for_the_rest(tmp_path):
    ours = modern_gpt(bias=True, qkv_bias=False)  # biases on proj/mlp only: Llama writes q/k/v biases of 0
    save_hf_llama(ours, tmp_path / "out")
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    x = sample_ids(length=12)
    with torch.no_grad():
        assert (ours(x)[0] - hf_logits(hf, x)).abs().max().item() < 1e-4


def test_cli_import_and_export_a_llama_run_round_trip(tmp_path):
    tokenizer = ByteLevelBPE.from_bpe(train_bpe("the cat sat on the mat. " * 40, 300))
    ours = modern_gpt(vocab=tokenizer.vocab_size)
    runs.create_run("modern-lm", "pretrain", {})
    save_model_run("modern-lm", ours, tokenizer)
    out = run_command(["export", "--run", "modern-lm", "--format", "hf", "--out", str(tmp_path / "exp")])
    assert out["architecture"] == "llama" and (tmp_path / "exp" / "glassbox_tokenizer.json").is_file()
    hf = LlamaForCausalLM.from_pretrained(out["path"]).eval()
    x = torch.tensor([tokenizer.encode("the cat sat")])
    with torch.no_grad():
        assert (ours(x)[0] - hf_logits(hf, x)).abs().max().item() < 1e-4

    result = run_command(["import", "--from", out["path"], "--run-id", "back"])
    assert result["run_id"] == "back" and result["architecture"] == "llama"
    assert result["parameters"] == ours.num_parameters()
    back, back_tokenizer, config = load_model_run("back")
    assert config["stage"] == "import" and back_tokenizer.encode("the mat") == tokenizer.encode("the mat")
    with torch.no_grad():
        assert (back(x)[0] - ours(x)[0]).abs().max().item() < 1e-5


def test_a_bad_llama_folder_is_refused_and_nothing_is_saved(tmp_path):
    hf_llama().save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(48, 64)  # 3 key/value heads' rows, config says 2
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(LlamaFormatError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight has shape \(48, 64\)"
                                               r".*2 key/value heads.*needs \(32, 64\)"):
        load_hf_llama(tmp_path / "hf")
    with pytest.raises(GlassBoxError, match="k_proj"):
        run_command(["import", "--from", str(tmp_path / "hf"), "--run-id", "bad"])
    assert not runs.run_dir("bad").exists()

    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(LlamaFormatError, match=r"lack the tensor 'model\.layers\.1\.self_attn\.k_proj\.weight'"):
        load_hf_llama(tmp_path / "hf")

    config_path = tmp_path / "hf" / "config.json"
    config = json.loads(config_path.read_text())
    for change, words in [({"num_key_value_heads": 3}, "must divide n_head"), ({"hidden_act": "gelu"}, "SiLU"),
                          ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "stretches RoPE"),
                          ({"head_dim": 32}, "head_dim"), ({"num_attention_heads": 5}, "divide")]:
        config_path.write_text(json.dumps({**config, **change}))
        with pytest.raises(LlamaFormatError, match=words):
            load_hf_llama(tmp_path / "hf")
    # an existing run of the same name is refused before anything is read, and left as it was
    runs.create_run("keep", "pretrain", {"note": "mine"})
    with pytest.raises(GlassBoxError, match="already exists"):
        run_command(["import", "--from", str(tmp_path / "hf"), "--run-id", "keep"])
    assert runs.open_run("keep").config["note"] == "mine"


def test_a_gpt2_block_cannot_be_written_as_llama_nor_a_mix_as_either(tmp_path):
    gpt2_block = GPT(GPTConfig(vocab_size=50, context_length=16, n_embd=32, n_head=4, n_layer=1))
    with pytest.raises(ModelConfigError, match="Llama layout"):
        save_hf_llama(gpt2_block, tmp_path / "x")
    mixed = modern_gpt(vocab=50, mlp="gelu")
    with pytest.raises(GlassBoxError, match="mixes the GPT-2 and the Llama block"):
        architecture_of(mixed.config)
