"""The microscope panel (pages/_ui/microscope.py) in a tiny host page: each view renders, a clicked
candidate branches the generation and Back undoes it, sliders redraw, bad input is a message."""

import inspect
import json
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.gpt import microscope
from core.gpt.instruct import format_prompt
from core.gpt.model import GPT, preset_config
from core.gpt.tokenizers import GPT2_SPLIT_PATTERN, train_bpe
from core.lab import models, runs
from core.lab.tokenizer_files import ByteLevelBPE
from tests.page_helpers import all_text

HOST = str(Path(__file__).resolve().parent / "microscope_host.py")
CORPUS = "To be, or not to be, that is the question. Whether tis nobler in the mind to suffer. " * 8


def make_run(run_id: str, stage: str = "pretrain", **shape) -> str:
    tokenizer = train_bpe(CORPUS + format_prompt({"instruction": "x"}), 300)
    torch.manual_seed(0)
    runs.create_run(run_id, stage, {})
    models.save_model_run(run_id, GPT(preset_config("tiny", tokenizer.vocab_size, **shape)), tokenizer)
    return run_id


def host(run_id: str | None, **state) -> AppTest:
    at = AppTest.from_file(HOST, default_timeout=60)
    at.session_state["host_run"] = run_id
    for name, value in state.items():
        at.session_state[f"host_{name}"] = value
    at.run()
    assert not at.exception, at.exception
    return at


def candidates(at: AppTest) -> list:
    found = [b for b in at.button if (b.key or "").startswith("scope_cand_")]
    return sorted(found, key=lambda b: int(b.key.rsplit("_", 1)[1]))  # by rank, not by column


def path(at: AppTest) -> list[int]:
    return [i for i, _ in at.session_state["scope_path"]]


def charts(at: AppTest) -> list[dict]:
    return [json.loads(c.proto.spec) for c in at.get("plotly_chart")]


def metric(at: AppTest, name: str) -> str:
    return next(m.value for m in at.metric if m.label.startswith(name))


@pytest.fixture
def lm():
    return make_run("lm")


def test_without_a_run_the_panel_says_what_to_do():
    at = host(None)
    assert any("Choose a run" in i.value for i in at.info)


def test_the_step_view_shows_ten_candidates_and_the_three_distributions(lm):
    at = host(lm)
    assert len(candidates(at)) == 10
    assert [b.key for b in candidates(at)] == [f"scope_cand_{i}" for i in range(10)]
    assert metric(at, "Entropy").endswith("bits")
    bars = charts(at)[0]
    assert [trace["name"] for trace in bars["data"]] == ["raw softmax", "after temperature", "kept (top-k / top-p)"]
    for trace in bars["data"]:  # ten candidates, each a probability
        assert len(trace["x"]) == 10 and all(0 <= p <= 1 for p in trace["x"])
    # the code behind the distributions is their live source
    codes = [c.value.strip() for c in at.code]
    assert inspect.getsource(microscope.three_distributions).strip() in codes
    assert inspect.getsource(microscope.generate_steps).strip() in codes


def test_clicking_a_candidate_branches_and_back_undoes_it(lm):
    at = host(lm)
    fourth = candidates(at)[3]
    model, tokenizer, _ = models.load_model_run(lm)
    prompt_ids = tokenizer.encode("To be, or not")
    with torch.no_grad():
        probs = torch.softmax(model(torch.tensor([prompt_ids]))[0][0, -1], -1)
    expected = int(torch.argsort(probs, descending=True)[3])
    fourth.click().run()
    assert not at.exception, at.exception
    assert path(at) == [expected]  # the clicked token is the next token of the text
    assert at.session_state["scope_path"][0][1] == "clicked"
    history = at.dataframe[0].value
    assert history["rank"].tolist() == [4] and history["how"].tolist() == ["clicked"]
    assert tokenizer.token_text(expected).replace(" ", "·") in "".join(m.value for m in at.markdown)
    # the next step's candidates are the model's answer to the continued text
    with torch.no_grad():
        after = torch.softmax(model(torch.tensor([prompt_ids + [expected]]))[0][0, -1], -1)
    assert candidates(at)[0].label.startswith(microscope_label(tokenizer, int(after.argmax())))
    at.button(key="scope_back").click().run()
    assert path(at) == []


def microscope_label(tokenizer, token_id: int) -> str:
    return tokenizer.token_text(token_id).replace(" ", "·").replace("\n", "↵").replace("\t", "⇥")


def test_next_takes_the_token_the_sampler_drew_and_temperature_zero_is_greedy(lm):
    at = host(lm)
    at.slider(key="scope_temperature").set_value(0.0).run()
    assert metric(at, "Tokens kept") == "1"
    assert metric(at, "Rank") == "1"
    at.button(key="scope_next").click().run()
    model, tokenizer, _ = models.load_model_run(lm)
    prompt_ids = tokenizer.encode("To be, or not")
    greedy = model.generate(torch.tensor([prompt_ids]), 9, temperature=0)[0].tolist()[len(prompt_ids):]
    assert path(at) == greedy[:1]
    at.button(key="scope_more").click().run()
    assert path(at) == greedy[:9]
    at.button(key="scope_reset").click().run()
    assert path(at) == []


def test_sliders_redraw_the_kept_set(lm):
    at = host(lm)
    assert int(metric(at, "Tokens kept").replace(",", "")) == models.load_model_run(lm)[0].config.vocab_size
    at.number_input(key="scope_top_k").set_value(3).run()
    assert metric(at, "Tokens kept") == "3"
    assert sum("(cut)" in b.label for b in candidates(at)) == 7
    at.number_input(key="scope_top_k").set_value(None).run()
    at.slider(key="scope_top_p").set_value(0.02).run()
    assert int(metric(at, "Tokens kept").replace(",", "")) < 50


@pytest.mark.parametrize("widget,value,words", [("top_p", 0.0, "top-p"), ("top_k", 0, "top-k")])
def test_bad_sampler_settings_are_a_message_and_the_panel_goes_on(lm, widget, value, words):
    at = host(lm)
    target = at.slider(key=f"scope_{widget}") if widget == "top_p" else at.number_input(key=f"scope_{widget}")
    target.set_value(value).run()
    assert not at.exception
    assert any(words in e.value for e in at.error)
    assert metric(at, "Mean loss")  # the other views still work


def test_empty_and_too_long_prompts(lm):
    at = host(lm, prompt="")
    assert any("empty" in e.value for e in at.error)
    at = host(make_run("short", context_length=16), prompt="To be, or not to be, " * 10)
    assert any("were cut" in w.value for w in at.warning)
    assert len(candidates(at)) == 10


def test_the_kv_cache_view_counts_bytes_and_times_tokens(lm):
    at = host(lm)
    text = all_text(at)
    cfg = models.load_model_run(lm)[0].config
    per_token = 2 * cfg.n_layer * cfg.n_embd * 4
    assert f"{per_token:,} bytes per token" in text
    at.button(key="scope_time").click().run()
    assert not at.exception, at.exception
    assert metric(at, "With the cache").endswith("ms/token")
    assert metric(at, "Speed-up").endswith("×")


def test_surprise_view_colours_tokens_and_matches_forward(lm):
    at = host(lm, text="Whether tis nobler in the mind")
    assert metric(at, "Mean loss") == metric(at, "forward's loss")
    html = "".join(m.value for m in at.markdown)
    assert "the model expected:" in html and "p = " in html
    # one loss colour per predicted token: the first token has nothing before it
    n_tokens = len(models.load_model_run(lm)[1].encode("Whether tis nobler in the mind"))
    assert html.count("background:rgb(255,") == n_tokens - 1


def test_surprise_on_an_instruction_run_scores_the_answer(lm):
    make_run("tuned", "instruct", context_length=256)
    at = host("tuned", text="To be.")
    assert any("alpaca" in c.value for c in at.caption)
    assert at.text_input(key="scope_surprise_instruction").value
    assert metric(at, "Mean loss").endswith("nats") and "(answer)" in next(
        m.label for m in at.metric if m.label.startswith("Mean loss"))


def test_logit_lens_view_draws_the_grid_and_an_attention_head(lm):
    at = host(lm, text="To be, or not to be")
    grid, attention = charts(at)[1:3]
    assert grid["data"][0]["y"] == ["embeddings", "block 0", "block 1"]
    n = len(grid["data"][0]["x"])
    assert len(grid["data"][0]["z"]) == 3 and all(len(row) == n for row in grid["data"][0]["z"])
    weights = attention["data"][0]["z"]
    assert len(weights) == n and all(abs(sum(row) - 1) < 1e-3 for row in weights)
    assert any("final guess" in c.value for c in at.caption)
    at.selectbox(key="scope_lens_head").set_value(3).run()
    assert not at.exception
    assert inspect.getsource(microscope.logit_lens).strip() in [c.value.strip() for c in at.code]


def test_a_classifier_run_is_refused_in_every_view(lm):
    runs.create_run("spam", "classify", {"model": runs.open_run(lm).config["model"],
                                         "classifier": {"num_classes": 2}}, parent=lm)
    at = host("spam")
    errors = [e.value for e in at.error]
    assert len(errors) == 3 and all("classifier" in e for e in errors)


def test_an_imported_chat_model_works_in_every_view():
    specials = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
    tokenizer = ByteLevelBPE("toychat", GPT2_SPLIT_PATTERN, {bytes([b]): b for b in range(256)}, specials)
    torch.manual_seed(0)
    runs.create_run("chatty", "import", {})
    models.save_model_run("chatty", GPT(preset_config("tiny", 259, context_length=256)), tokenizer)
    at = host("chatty", prompt="Hi")
    assert not at.error, [e.value for e in at.error]
    assert any("chatml" in c.value for c in at.caption)
    assert "&lt;|im_start|&gt;" in "".join(m.value for m in at.markdown)  # the template, escaped
    assert len(candidates(at)) == 10
    candidates(at)[0].click().run()
    assert len(path(at)) == 1 and not at.exception
    assert at.text_input(key="scope_surprise_instruction").value
