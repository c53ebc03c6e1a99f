"""GPT-2 weights in and out: our GPT computes exactly what Hugging Face's GPT2LMHeadModel computes.

`transformers` is a test-only dependency; nothing is downloaded (the models are random and small).
"""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel  # noqa: E402

from core.lab import runs  # noqa: E402
from core.__main__ import run_command  # noqa: E402
from core.gpt.errors import GlassBoxError  # noqa: E402
from core.lab.gpt2 import GPT2FormatError, download_gpt2, load_hf_gpt2, save_hf_gpt2  # noqa: E402
from core.gpt.model import GPT, GPTConfig  # noqa: E402
from core.lab.models import load_model_run, save_model_run


def hf_model(vocab=100, n_layer=2, n_embd=64, n_head=4, n_positions=32, tie=True, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=vocab,
                        n_positions=n_positions, tie_word_embeddings=tie,
                        bos_token_id=vocab - 1, eos_token_id=vocab - 1)
    model = GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random biases and norms too, so every tensor's mapping is checked
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def hf_logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def sample_ids(vocab=100, length=20):
    return torch.randint(vocab, (2, length), generator=torch.Generator().manual_seed(1))


def test_a_saved_gpt2_loads_into_our_gpt_with_equal_logits(tmp_path):
    hf = hf_model()
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_gpt2(tmp_path / "hf")
    assert (ours.config.n_layer, ours.config.n_embd, ours.config.context_length) == (2, 64, 32)
    assert ours.config.qkv_bias and ours.config.tie_weights
    x = sample_ids()
    with torch.no_grad():
        logits, _ = ours(x)
    assert (logits - hf_logits(hf, x)).abs().max().item() < 1e-4
    # The teaching path agrees as well.
    ours.set_attention("teaching")
    with torch.no_grad():
        assert (ours(x)[0] - hf_logits(hf, x)).abs().max().item() < 1e-4


def test_our_export_loads_into_transformers_with_equal_logits(tmp_path):
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=100, context_length=32, n_embd=64, n_head=4, n_layer=2)).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_hf_gpt2(ours, tmp_path / "out")
    # Models trained here use the exact GELU, which Hugging Face calls "gelu".
    assert json.loads((tmp_path / "out" / "config.json").read_text())["activation_function"] == "gelu"
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert load_hf_gpt2(tmp_path / "out").config.gelu == "exact"
    x = sample_ids()
    with torch.no_grad():
        logits, _ = ours(x)
    assert (logits - hf_logits(hf, x)).abs().max().item() < 1e-4
    # Greedy generation agrees token for token.
    prompt = x[:1, :4]
    ours_out = ours.generate(prompt, 8, temperature=0)
    hf_out = hf.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert ours_out.tolist() == hf_out.tolist()


def test_untied_output_head_survives_both_ways(tmp_path):
    hf = hf_model(tie=False, seed=2)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_hf_gpt2(tmp_path / "hf")
    assert not ours.config.tie_weights
    x = sample_ids()
    with torch.no_grad():
        assert (ours(x)[0] - hf_logits(hf, x)).abs().max().item() < 1e-4
    save_hf_gpt2(ours, tmp_path / "back")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "back").eval()
    assert (hf_logits(again, x) - hf_logits(hf, x)).abs().max().item() < 1e-4


def test_missing_or_mismatched_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    hf_model().save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    del tensors["transformer.h.1.mlp.c_fc.bias"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(GPT2FormatError, match=r"h\.1\.mlp\.c_fc\.bias"):
        load_hf_gpt2(tmp_path / "hf")

    tensors = load_file(path)
    tensors["transformer.h.1.mlp.c_fc.bias"] = torch.zeros(5)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(GPT2FormatError, match=r"blocks\.1\.mlp\.fc\.bias has shape \(5,\)"):
        load_hf_gpt2(tmp_path / "hf")

    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["n_layer"] = 1  # the file has two layers of tensors
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    with pytest.raises(GPT2FormatError, match=r"h\.1\."):
        load_hf_gpt2(tmp_path / "hf")

    (tmp_path / "empty").mkdir()
    with pytest.raises(GPT2FormatError, match="has no config.json"):
        load_hf_gpt2(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(GPT2FormatError, match="has no model.safetensors"):
        load_hf_gpt2(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(GPT2FormatError, match="not GPT-2"):
        load_hf_gpt2(tmp_path / "empty")


def test_cli_export_then_import_round_trips_a_run(tmp_path):
    from core.gpt.tokenizers import train_char

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, context_length=16, n_embd=32, n_head=4, n_layer=2)).eval()
    tokenizer = train_char("hello world, a tiny corpus.")
    runs.create_run("tiny-lm", "pretrain", {})
    save_model_run("tiny-lm", model, tokenizer)

    out = run_command(["export", "--run", "tiny-lm", "--format", "hf", "--out", str(tmp_path / "exp")])
    assert (tmp_path / "exp" / "model.safetensors").is_file() and out["path"].endswith("exp")
    hf = GPT2LMHeadModel.from_pretrained(out["path"]).eval()
    x = torch.tensor([tokenizer.encode("hello")])
    with torch.no_grad():
        assert (model(x)[0] - hf_logits(hf, x)).abs().max().item() < 1e-4

    result = run_command(["import-gpt2", "--from", out["path"], "--run-id", "back"])
    assert result["run_id"] == "back"
    back, back_tokenizer, config = load_model_run("back")
    assert config["stage"] == "import" and back_tokenizer.decode(back_tokenizer.encode("hello")) == "hello"
    with torch.no_grad():
        assert (back(x)[0] - model(x)[0]).abs().max().item() < 1e-5

    with pytest.raises(GlassBoxError, match="already exists"):
        run_command(["import-gpt2", "--from", out["path"], "--run-id", "back"])
    with pytest.raises(GlassBoxError, match="no GPT-2 tokenizer fits|no tokenizer fits"):
        hf_model().save_pretrained(tmp_path / "hf")
        run_command(["import-gpt2", "--from", str(tmp_path / "hf"), "--run-id", "odd"])
    assert not runs.run_dir("odd").exists()  # nothing half-made is left behind


def test_importing_a_gpt2_vocabulary_model_uses_the_gpt2_tokenizer(tmp_path):
    hf_model(vocab=50257, n_layer=1, n_embd=8, n_head=2, n_positions=16).save_pretrained(tmp_path / "hf")
    run_command(["import-gpt2", "--from", str(tmp_path / "hf"), "--run-id", "g"])
    model, tokenizer, config = load_model_run("g")
    assert tokenizer.kind == "gpt2" and config["tokenizer"] == "gpt2" and config["stage"] == "import"
    ids = tokenizer.encode("Hello world")
    out = model.generate(torch.tensor([ids]), 3, temperature=0)
    assert out.shape == (1, len(ids) + 3)


def test_inspect_reports_budget_and_shapes():
    result = run_command(["inspect", "--preset", "small", "--vocab-size", "65", "--tokens", "5"])
    assert result["parameters"] == sum(result["breakdown"].values())
    from core.gpt.model import PRESETS

    assert result["layers"] == PRESETS["small"]["n_layer"] and result["shapes"]["lm_head"] == [1, 5, 65]
    assert f"blocks.{result['layers'] - 1}.mlp.fc" in result["shapes"]
    big = run_command(["inspect", "--preset", "gpt2-124m"])
    assert big["parameters"] == 124_439_808 and big["shapes"]["blocks.11.mlp.fc"] == [1, 8, 3072]


def test_download_streams_the_two_files_from_a_hub_address(tmp_path):
    """The hub download with a file:// address standing in for huggingface.co (tests stay offline)."""
    hf_model().save_pretrained(tmp_path / "hub" / "someone" / "tiny" / "resolve" / "main")
    seen = []
    folder = download_gpt2("someone/tiny", dest=tmp_path / "dl", base_url=(tmp_path / "hub").as_uri(),
                           progress=lambda done, total, name: seen.append(name))
    assert {"config.json", "model.safetensors"} <= set(seen)
    assert load_hf_gpt2(folder).config.n_layer == 2
    with pytest.raises(GlassBoxError, match="Could not download"):
        download_gpt2("someone/missing", dest=tmp_path / "dl2", base_url=(tmp_path / "hub").as_uri())
