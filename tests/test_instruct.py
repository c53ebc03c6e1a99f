"""Stage 6: instruction data, template, split, collate, answers, format rate, and a tiny tuning run."""

import json
import os

import pytest
import torch

from core.gpt.errors import GlassBoxError, TokenizerError
from core.lab.errors import DataError
from core.gpt import instruct as ins
from core.stages import instruct as stage


def run_instruct(run_id, start, config, resume=False, **settings):
    """Stage 6 as `python -m core instruct` runs it: the stage, then the run's end recorded."""
    from core.lab import runs

    with pytest.MonkeyPatch.context() as mp:  # as inside `python -m core`
        mp.setattr(runs, "_command_line", getattr(runs, "_command_line", False))
        runs.started_from_command_line()
        result = stage.run(stage.Settings(start=start, run_id=run_id, resume=resume, **settings),
                           train_config=config)
        runs.finish_runs_started_here(stopped=bool(result.get("stopped")))
    return result

SHARED_DATA = os.environ.get("GLASSBOX_DATA_DIR") or "/work/shared/data"
# conftest.py gives every test empty checkpoints/ and data/ folders and finds the shared data.


class ByteTokenizer:
    """Bytes 0-255 plus <|endoftext|> = 256: enough to test encoding and collate exactly."""

    kind = "bytes"
    vocab_size = 257
    eot_id = 256

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


RECORD = {"instruction": "Rewrite the sentence using a simile.", "input": "The car is very fast.",
          "output": "The car is as fast as lightning."}


# --- template -------------------------------------------------------------------------------

def test_prompt_template_matches_the_book():
    assert ins.format_prompt(RECORD) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nRewrite the sentence using a simile."
        "\n\n### Input:\nThe car is very fast.\n\n### Response:\n"
    )
    assert ins.format_example(RECORD).endswith("### Response:\nThe car is as fast as lightning.")


def test_prompt_without_input_has_no_input_section():
    prompt = ins.format_prompt({"instruction": "Name a colour.", "input": "", "output": "Blue."})
    assert "### Input" not in prompt
    assert prompt.endswith("### Instruction:\nName a colour.\n\n### Response:\n")


# --- data and split -------------------------------------------------------------------------

def test_registry_data_splits_like_the_book():
    records = stage.load_instruction_data("instruction-data")
    assert len(records) == 1100
    splits = ins.split_records(records)
    assert {k: len(v) for k, v in splits.items()} == {"train": 935, "test": 110, "val": 55}
    with open(os.path.join(SHARED_DATA, "instruction-data-with-response.json")) as f:
        book_test = json.load(f)
    assert [r["instruction"] for r in splits["test"]] == [r["instruction"] for r in book_test]


def test_seeded_split_is_reproducible_and_shuffled():
    records = [{"instruction": f"i{n}", "input": "", "output": f"o{n}"} for n in range(100)]
    a, b = ins.split_records(records, seed=7), ins.split_records(records, seed=7)
    assert a == b
    assert a["train"] != records[:85]
    assert (len(a["train"]), len(a["test"]), len(a["val"])) == (85, 10, 5)


def test_too_few_records_is_a_data_error():
    with pytest.raises(DataError, match="too few"):
        ins.split_records([RECORD] * 5)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[]", "non-empty JSON list"),
    (json.dumps([RECORD, {"instruction": "x", "input": ""}]), "Record 1 .*missing the field.*output"),
    (json.dumps([RECORD, "just text"]), "Record 1 .*not a JSON object"),
    (json.dumps([{"instruction": "x", "input": 3, "output": "y"}]), "Record 0 .*input must be text"),
    (json.dumps([{"instruction": " ", "input": "", "output": "y"}]), "Record 0 .*empty instruction"),
])
def test_malformed_data_names_the_problem(text, message):
    with pytest.raises(DataError, match=message):
        ins.parse_instruction_records(text, origin="test.json")


def test_data_from_a_local_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps([RECORD, {"instruction": "x"}]))
    with pytest.raises(DataError, match="Record 1"):
        stage.load_instruction_data(f"file:{path}")


# --- encoding and collate -------------------------------------------------------------------

def test_encoding_is_prompt_then_answer_then_end_of_text():
    tok = ByteTokenizer()
    ex = ins.encode_example(tok, RECORD)
    assert ex.ids[-1] == tok.eot_id
    assert ex.prompt_length == len(ins.format_prompt(RECORD).encode())
    assert tok.decode(ex.ids[ex.prompt_length:-1]) == RECORD["output"]


def test_tokenizer_without_end_of_text_is_refused():
    class CharTokenizer(ByteTokenizer):
        kind, eot_id = "char", None

    with pytest.raises(TokenizerError, match="no end-of-text"):
        ins.encode_example(CharTokenizer(), RECORD)


def test_collate_pads_shifts_and_ignores_padding_after_first_eot():
    eot = 50
    short = ins.EncodedExample(ids=[1, 2, 3, eot], prompt_length=2)
    long = ins.EncodedExample(ids=[4, 5, 6, 7, 8, 9, eot], prompt_length=3)
    inputs, targets = ins.collate_instructions([short, long], pad_id=eot)
    assert inputs.shape == targets.shape == (2, 6)
    assert inputs.tolist() == [[1, 2, 3, eot, eot, eot], [4, 5, 6, 7, 8, 9]]
    # the first end-of-text is a target (learn to stop), the padding after it is ignored
    assert targets.tolist() == [[2, 3, eot, -100, -100, -100], [5, 6, 7, 8, 9, eot]]


def test_collate_can_mask_the_prompt():
    eot = 50
    ex = ins.EncodedExample(ids=[1, 2, 3, 10, 11, eot], prompt_length=3)  # prompt = 1 2 3
    _, targets = ins.collate_instructions([ex], pad_id=eot, mask_prompt=True)
    # only the answer tokens 10, 11 and the end-of-text are graded
    assert targets.tolist() == [[-100, -100, 10, 11, eot]]


def test_collate_truncates_to_the_context_length():
    ex = ins.EncodedExample(ids=list(range(20)) + [99], prompt_length=5)
    inputs, targets = ins.collate_instructions([ex], pad_id=99, context_length=8)
    assert inputs.shape == targets.shape == (1, 8)
    assert targets[0].tolist() == list(range(1, 9))


# --- answers and the format rate ------------------------------------------------------------

def test_extract_response_from_a_full_generation():
    full = ins.format_prompt(RECORD) + " The car is a rocket. <|endoftext|>more text"
    assert ins.extract_response(full) == "The car is a rocket."
    assert ins.extract_response("just an answer") == "just an answer"


@pytest.mark.parametrize("response, stopped, ok, why", [
    ("The car is as fast as lightning.", True, True, None),
    ("", True, False, "empty"),
    ("   ", True, False, "empty"),
    ("The car is fast and the", False, False, "no end-of-text"),
    ("Yes.\n\n### Instruction:\nWrite", True, False, "echoes"),
    ("Below is an instruction that describes", True, False, "echoes"),
    ("Fast.\n### Response: fast", True, False, "echoes"),
])
def test_format_rules_on_hand_made_answers(response, stopped, ok, why):
    assert ins.follows_format(response, stopped) is ok
    problems = ins.format_problems(response, stopped)
    assert (why is None and problems == []) or any(why in p for p in problems)


def test_format_rate_is_a_share():
    assert ins.format_rate([True, False, True, True]) == 0.75
    assert ins.format_rate([]) == 0.0


# --- a tiny model: training, the answers file, the command line --------------------------

TOY_RECORDS = [
    {"instruction": f"Say the word number {n}.", "input": "" if n % 2 else f"word {n}",
     "output": f"Word {n}."}
    for n in range(60)
]


def make_start_run(run_id="start", preset="tiny"):
    """A tiny untrained GPT with a small BPE, stored as a stage-4 run."""
    from core.lab import runs
    from core.gpt.model import GPT, preset_config
    from core.lab.models import save_model_run
    from core.gpt.tokenizers import train_bpe

    text = " ".join(ins.format_example(r) for r in TOY_RECORDS)
    tokenizer = train_bpe(text, 300)
    torch.manual_seed(0)
    model = GPT(preset_config(preset, tokenizer.vocab_size, context_length=96))
    runs.create_run(run_id, "pretrain", {})
    save_model_run(run_id, model, tokenizer)
    return model, tokenizer


def toy_data_file(tmp_path):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(TOY_RECORDS))
    return f"file:{path}"


def test_tiny_model_learns_the_format_and_writes_responses(tmp_path):
    from core.lab import runs
    from core.gpt.train import TrainConfig

    make_start_run()
    settings = dict(data=toy_data_file(tmp_path), eval_limit=3, max_new_tokens=10,
                    mask_prompt=True)  # grading the answer only: learnt in 40 steps
    config = TrainConfig(max_steps=40, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=5,
                         eval_every=20, sample_every=20, log_every=5, checkpoint_every=100)
    result = run_instruct("tuned", "start", config, **settings)

    metrics = runs.open_run("tuned").metrics()
    assert metrics[-1]["train_loss"] < 0.5 * metrics[0]["train_loss"]  # the loss falls
    assert result["val_loss"] is not None and result["val_loss"] < metrics[0]["train_loss"]
    assert result["format_rate_start"] == 0.0          # an untrained model never stops in time
    assert result["format_rate_tuned"] > result["format_rate_start"]

    folder = runs.run_dir("tuned")
    responses = json.loads((folder / "responses.json").read_text())
    assert len(responses) == 3
    for key in ("instruction", "input", "output", "base_response", "tuned_response"):
        assert all(key in r for r in responses)
    rates = json.loads((folder / "format_rates.json").read_text())
    assert rates["start"] == result["format_rate_start"] and rates["n"] == 3
    assert runs.open_run("tuned").config["parent"] == "start"
    assert runs.read_status("tuned")["state"] == "finished"  # run from a shell, not as a job
    assert runs.open_run("tuned").samples()  # answers to the validation instruction over time


def test_batches_are_a_function_of_the_step():
    model, tokenizer = make_start_run()
    splits = ins.split_records(TOY_RECORDS)
    task = ins.InstructionTask(tokenizer, splits, context_length=96)
    a = task.get_batch("train", 3, 8)
    b = task.get_batch("train", 3, 8)
    c = task.get_batch("train", 4, 8)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # one epoch covers every training example exactly once
    n = len(splits["train"])
    seen = [tuple(x) for step in range(n) for x in task.get_batch("train", step, 1)[0].tolist()]
    assert len(set(seen)) == n


def test_cli_reports_both_rates_and_refuses_bad_input(tmp_path, capsys):
    from core.__main__ import main

    make_start_run()
    argv = ["instruct", "--from", "start", "--data", toy_data_file(tmp_path), "--steps", "3",
            "--eval-limit", "2", "--max-new-tokens", "4", "--run-id", "cli"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("run_id", "val_loss", "format_rate_start", "format_rate_tuned", "seconds", "train_loss"):
        assert key in result
    assert result["run_id"] == "cli"

    assert main(argv) == 2  # the run id is taken
    assert "already exists" in capsys.readouterr().err
    assert main(argv[:2] + ["nope"] + argv[3:-1] + ["cli2"]) == 2
    assert "nope" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("[{\"instruction\": \"x\"}]")
    assert main(argv[:4] + [f"file:{bad}"] + argv[5:-1] + ["cli3"]) == 2
    assert "Record 0" in capsys.readouterr().err


def test_start_run_must_be_a_language_model(tmp_path):
    from core.lab import runs
    from core.lab.errors import RunError

    runs.create_run("tok", "tokenizer", {})
    with pytest.raises(RunError, match="pre-trained"):
        stage.load_start_model("tok")


def test_empty_instruction_is_refused():
    model, tokenizer = make_start_run()
    with pytest.raises(GlassBoxError, match="Type an instruction"):
        ins.generate_answer(model, tokenizer, {"instruction": "  ", "input": ""})


def test_stop_and_resume(tmp_path, monkeypatch):
    from core.lab import runs
    from core.gpt.train import TrainConfig

    make_start_run()
    settings = dict(data=toy_data_file(tmp_path), eval_limit=2, max_new_tokens=4)
    config = TrainConfig(max_steps=10, batch_size=4, lr=1e-3, warmup_steps=2, eval_every=5,
                         sample_every=5, log_every=1, checkpoint_every=100)
    # as inside a background job: the id is reserved first, and Stop was pressed at once
    monkeypatch.setenv(runs.JOB_RUN_ID_ENV, "r")
    runs.reserve_run("r")
    runs.request_stop("r")
    stopped = run_instruct("r", "start", config, **settings)
    assert stopped["stopped"] and stopped["format_rate_tuned"] is None
    assert not (runs.run_dir("r") / "responses.json").exists()
    runs.clear_stop("r")
    done = run_instruct("r", "start", config, resume=True, **settings)
    assert done["steps"] == 10 and not done["stopped"]
    assert (runs.run_dir("r") / "responses.json").exists()


# --- best weights and LoRA ------------------------------------------------------------------

def test_the_run_keeps_the_weights_of_its_best_validation_loss(tmp_path):
    from core.lab import runs
    from core.gpt.train import TrainConfig

    make_start_run()
    config = TrainConfig(max_steps=12, batch_size=4, lr=3e-2, min_lr=3e-2, warmup_steps=1, eval_every=3,
                         sample_every=100, log_every=1, checkpoint_every=100)  # a rate high enough to wobble
    result = run_instruct("kept", "start", config, data=toy_data_file(tmp_path), eval_limit=2,
                          max_new_tokens=4, patience=0)
    evals = [m for m in runs.open_run("kept").metrics() if m.get("val_loss") is not None]
    best = min(evals, key=lambda m: m["val_loss"])
    assert result["weights_step"] == best["step"] and result["val_loss"] == pytest.approx(best["val_loss"], abs=1e-5)
    rates = json.loads((runs.run_dir("kept") / "format_rates.json").read_text())
    assert rates["weights_step"] == best["step"] and not rates["early_stopped"]
    # the saved weights are those weights: their validation loss is the best one
    model, tokenizer, _ = stage.load_language_model("kept")
    splits = ins.split_records(stage.load_instruction_data(toy_data_file(tmp_path)))
    task = ins.InstructionTask(tokenizer, splits, model.config.context_length)
    assert task.evaluate(model)["val_loss"] == pytest.approx(best["val_loss"], abs=1e-4)


def test_a_lora_instruction_run_saves_only_its_adapter(tmp_path):
    from core.lab import runs
    from core.gpt.train import TrainConfig

    base, _ = make_start_run()
    config = TrainConfig(max_steps=6, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=3, sample_every=100,
                         log_every=1, checkpoint_every=100)
    run_instruct("tuned-lora", "start", config, data=toy_data_file(tmp_path), eval_limit=2, max_new_tokens=4,
                 lora_rank=4, lora_targets=("qkv", "proj"))
    folder = runs.run_dir("tuned-lora")
    assert not (folder / "model.safetensors").exists() and (folder / "responses.json").exists()
    adapter = runs.load_tensors(folder / stage.ADAPTER_FILE)
    assert adapter and all(n.endswith(("lora_A", "lora_B")) for n in adapter)
    assert not any(".mlp." in n for n in adapter)  # only the matrices asked for
    start_model, tuned, tokenizer = stage.load_comparison_models("tuned-lora")
    x = torch.tensor([tokenizer.encode(ins.format_prompt(TOY_RECORDS[0]))])
    assert torch.allclose(start_model(x)[0], base.eval()(x)[0], atol=1e-5)  # the parent, untouched
    assert not torch.allclose(tuned(x)[0], start_model(x)[0], atol=1e-4)  # parent + a trained adapter
    runs.delete_run("start")
    with pytest.raises(GlassBoxError, match="'start'"):
        stage.load_language_model("tuned-lora")


def test_cli_refuses_bad_lora_settings(tmp_path, capsys):
    from core.__main__ import main

    make_start_run()
    base = ["instruct", "--from", "start", "--data", toy_data_file(tmp_path), "--steps", "1", "--run-id", "x"]
    assert main(base + ["--lora-rank", "0"]) == 2
    assert "rank" in capsys.readouterr().err
    assert main(base + ["--lora-rank", "500"]) == 2  # wider than the tiny model's matrices
    assert "larger than the matrix" in capsys.readouterr().err


def test_choice_costs_of_stage_6():
    make_start_run()
    rows = {r["what learns"]: r for r in stage.choice_costs("start", rank=2)}
    assert set(rows) == {"all", "lora"} and rows["all"]["share"] == 1.0
    assert 0 < rows["lora"]["trainable parameters"] < rows["all"]["trainable parameters"] / 5
