"""`python -m core generate | surprise | lens`: the microscope's CLI twins (JSON keys of DESIGN.md),
on a pre-trained, an instruction-tuned and a classifier run; bad input exits 2 with one line."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.__main__ import main
from core.gpt.instruct import format_prompt
from core.gpt.model import GPT, preset_config
from core.gpt.tokenizers import GPT2_SPLIT_PATTERN, train_bpe
from core.lab import cli, models, runs
from core.lab.tokenizer_files import ByteLevelBPE
from core.stages import generate, lens, surprise

REPO = Path(__file__).resolve().parent.parent
CORPUS = "To be, or not to be, that is the question. Whether tis nobler in the mind to suffer. " * 8


def make_run(run_id: str, stage: str, config: dict | None = None, seed: int = 0, **shape):
    tokenizer = train_bpe(CORPUS + format_prompt({"instruction": "x"}), 300)
    torch.manual_seed(seed)
    runs.create_run(run_id, stage, config or {})
    models.save_model_run(run_id, GPT(preset_config("tiny", tokenizer.vocab_size, **shape)), tokenizer)
    return run_id


@pytest.fixture
def lm():
    return make_run("lm", "pretrain")


def cli_json(argv: list[str], capsys) -> dict:
    assert main(argv) == 0, capsys.readouterr().err
    out = capsys.readouterr().out.strip().splitlines()
    return json.loads(out[-1])


def test_generate_json_has_the_designed_keys(lm, capsys):
    result = cli_json(["generate", "--run", "lm", "--prompt", "To be", "--max-new-tokens", "5",
                       "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"], capsys)
    assert {"text", "steps"} <= set(result)
    assert len(result["steps"]) == 5
    for step in result["steps"]:
        assert {"token", "rank", "entropy", "top"} <= set(step)
        assert step["rank"] >= 1 and step["entropy"] >= 0
        assert all({"token", "p_raw", "p_temperature", "p_kept"} <= set(c) for c in step["top"])
        assert step["token_id"] in [c["id"] for c in step["top"] if c["p_kept"] > 0] or step["rank"] > 10
    assert result["text"].startswith("To be")
    assert result["text"] == "To be" + result["completion"]
    # the same seed gives the same text; the KV cache holds every token but the newest
    again = cli_json(["generate", "--run", "lm", "--prompt", "To be", "--max-new-tokens", "5",
                      "--temperature", "0.8", "--top-k", "20", "--top-p", "0.9", "--seed", "3"], capsys)
    assert again["text"] == result["text"]
    assert result["kv_cache_tokens"] == len(result["prompt_ids"]) + 5 - 1


def test_generate_greedy_matches_the_models_own_generate(lm, capsys):
    result = cli_json(["generate", "--run", "lm", "--prompt", "To be", "--max-new-tokens", "8",
                       "--temperature", "0"], capsys)
    model, tokenizer, _ = models.load_model_run("lm")
    ids = tokenizer.encode("To be")
    expected = model.generate(torch.tensor([ids]), 8, temperature=0)[0].tolist()
    assert [s["token_id"] for s in result["steps"]] == expected[len(ids):]
    assert all(s["rank"] == 1 for s in result["steps"])
    assert all(c["p_kept"] in (0.0, 1.0) for s in result["steps"] for c in s["top"])


def test_forced_tokens_make_a_branch(lm, capsys):
    first = cli_json(["generate", "--run", "lm", "--prompt", "To be", "--max-new-tokens", "2",
                      "--temperature", "0"], capsys)
    branch = first["steps"][0]["top"][3]["id"]  # the model's 4th choice
    result = cli_json(["generate", "--run", "lm", "--prompt", "To be", "--max-new-tokens", "3",
                       "--temperature", "0", "--force", str(branch)], capsys)
    assert result["steps"][0]["token_id"] == branch and result["steps"][0]["forced"]
    assert result["steps"][0]["rank"] == 4
    assert not result["steps"][1]["forced"]
    assert result["prompt_ids"] + [s["token_id"] for s in result["steps"]][:1] == \
        result["prompt_ids"] + [branch]


def test_surprise_mean_loss_equals_forward_loss(lm, capsys):
    result = cli_json(["surprise", "--run", "lm", "--text", "Whether tis nobler in the mind"], capsys)
    assert len(result["losses"]) == len(result["tokens"]) - 1
    assert result["mean_loss"] == pytest.approx(result["forward_loss"], abs=1e-5)
    assert result["mean_loss"] == pytest.approx(sum(result["losses"]) / len(result["losses"]), abs=1e-5)
    assert all(len(a) == 5 for a in result["alternatives"])


def test_surprise_on_an_instruction_answer_uses_the_template(capsys):
    make_run("tuned", "instruct", context_length=256)
    result = cli_json(["surprise", "--run", "tuned", "--prompt", "Say hi.", "--text", "Hi there."], capsys)
    model, tokenizer, _ = models.load_model_run("tuned")
    prompt_ids = tokenizer.encode(format_prompt({"instruction": "Say hi.", "input": ""}))
    assert result["answer_start"] == len(prompt_ids)
    assert result["ids"] == prompt_ids + tokenizer.encode("Hi there.")
    assert len(result["losses"]) == len(result["ids"]) - 1
    assert "### Response:" in "".join(result["tokens"][: result["answer_start"]])


def test_generate_puts_an_instruction_runs_prompt_in_its_template(capsys):
    make_run("tuned", "instruct", context_length=256)
    result = cli_json(["generate", "--run", "tuned", "--prompt", "Say hi.", "--max-new-tokens", "2",
                       "--temperature", "0"], capsys)
    assert result["template"] == "alpaca"
    assert result["text"].startswith(format_prompt({"instruction": "Say hi.", "input": ""}))
    plain = cli_json(["generate", "--run", "tuned", "--prompt", "Say hi.", "--max-new-tokens", "2",
                      "--template", "none"], capsys)
    assert plain["text"].startswith("Say hi.")


def test_lens_json_is_layers_by_positions(lm, capsys):
    result = cli_json(["lens", "--run", "lm", "--text", "To be, or not to be", "--layer", "1", "--head", "2"],
                      capsys)
    n_layers, n_tokens = 2 + 1, len(result["tokens"])
    assert result["layers"] == ["embeddings", "block 0", "block 1"]
    assert len(result["top_tokens"]) == len(result["top_probs"]) == n_layers
    assert all(len(row) == n_tokens for row in result["top_tokens"] + result["top_probs"])
    model, tokenizer, _ = models.load_model_run("lm")
    with torch.no_grad():
        logits = model(torch.tensor([result["ids"]]))[0][0]
    assert result["top_ids"][-1] == logits.argmax(-1).tolist()  # the last layer is the model's own guess
    attention = torch.tensor(result["attention"])
    assert attention.shape == (n_tokens, n_tokens)
    assert torch.allclose(attention.sum(-1), torch.ones(n_tokens), atol=1e-3)
    assert float(attention.triu(1).abs().max()) == 0.0  # causal: nobody looks ahead


def test_text_longer_than_the_context_says_what_was_cut(capsys):
    make_run("short", "pretrain", context_length=16)
    text = "To be, or not to be, that is the question. " * 6
    result = cli_json(["surprise", "--run", "short", "--text", text], capsys)
    assert len(result["tokens"]) == 16
    assert "the last" in result["note"] and "cut" in result["note"]
    result = cli_json(["lens", "--run", "short", "--text", text], capsys)
    assert len(result["tokens"]) == 16
    result = cli_json(["generate", "--run", "short", "--prompt", text, "--max-new-tokens", "20"], capsys)
    assert len(result["prompt_ids"]) == 16 and "the first" in result["note"]
    assert len(result["steps"]) == 20  # the window slides past the context


def test_a_classifier_run_is_refused_clearly(capsys):
    make_run("lm", "pretrain")
    runs.create_run("spam", "classify", {"model": runs.open_run("lm").config["model"],
                                         "classifier": {"num_classes": 2}}, parent="lm")
    for argv in (["generate", "--run", "spam", "--prompt", "hi"], ["surprise", "--run", "spam", "--text", "hi there"],
                 ["lens", "--run", "spam", "--text", "hi"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "classifier" in err and "Traceback" not in err


BAD = [
    (["generate", "--run", "lm", "--prompt", ""], "empty"),
    (["generate", "--run", "lm", "--prompt", "a", "--top-p", "0"], "top-p"),
    (["generate", "--run", "lm", "--prompt", "a", "--top-p", "1.5"], "top-p"),
    (["generate", "--run", "lm", "--prompt", "a", "--top-k", "0"], "top-k"),
    (["generate", "--run", "lm", "--prompt", "a", "--temperature", "-1"], "Temperature"),
    (["generate", "--run", "lm", "--prompt", "a", "--max-new-tokens", "0"], "max-new-tokens"),
    (["generate", "--run", "lm", "--prompt", "a", "--force", "99999"], "vocabulary"),
    (["generate", "--run", "nope", "--prompt", "a"], "nope"),
    (["generate", "--prompt", "a"], "--run"),
    (["surprise", "--run", "lm", "--text", ""], "empty"),
    (["surprise", "--run", "lm", "--text", "T"], "two"),
    (["lens", "--run", "lm", "--text", "   "], "empty"),
    (["lens", "--run", "lm", "--text", "To be", "--layer", "7", "--head", "0"], "blocks 0"),
    (["lens", "--run", "lm", "--text", "To be", "--layer", "0"], "together"),
]


@pytest.mark.parametrize("argv,words", BAD, ids=lambda a: " ".join(a)[:50] if isinstance(a, list) else a)
def test_bad_input_gives_one_line_and_exit_2(lm, argv, words, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and "Traceback" not in err and len(lines) == 1
    assert lines[0].startswith("error: ") and words in lines[0]


@pytest.mark.parametrize("module", [generate, surprise, lens])
def test_settings_round_trip_through_argv(module):
    settings = module.Settings(run="lm", **({"prompt": "To be", "top_k": 5, "force": (3, 4)}
                                            if module is generate else {"text": "To be"}))
    parser = __import__("argparse").ArgumentParser()
    cli.add_arguments(parser, module.Settings)
    assert cli.settings_from_args(module.Settings, parser.parse_args(cli.to_argv(settings))) == settings


def test_the_command_line_prints_json_last(lm, isolated_workspace):
    env = {**__import__("os").environ, "GLASSBOX_CHECKPOINTS_DIR": str(isolated_workspace["checkpoints"])}
    done = subprocess.run([sys.executable, "-m", "core", "surprise", "--run", "lm", "--text", "To be or not"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["mean_loss"] == pytest.approx(result["forward_loss"], abs=1e-5)


def test_an_imported_chat_model_gets_chatml_and_stops_at_the_end_of_its_turn(capsys):
    specials = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
    tokenizer = ByteLevelBPE("toychat", GPT2_SPLIT_PATTERN, {bytes([b]): b for b in range(256)}, specials)
    torch.manual_seed(0)
    runs.create_run("chatty", "import", {})
    models.save_model_run("chatty", GPT(preset_config("tiny", 259, context_length=256)), tokenizer)
    result = cli_json(["generate", "--run", "chatty", "--prompt", "Hi", "--max-new-tokens", "5",
                       "--force", "72,258"], capsys)
    assert result["template"] == "chatml"
    assert "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n" in result["text"]
    assert result["prompt_ids"].count(257) == 3  # system, user, assistant: one special id each
    assert [s["token_id"] for s in result["steps"]] == [72, 258]  # <|im_end|> ends the reply
    assert result["completion"] == "H<|im_end|>"
