"""Chat page: two turns with a tiny model, the prompt with its special tokens highlighted, the
KV-cache meter, the context cut said out loud, and an empty state without chat models."""

import os
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.gpt import tokenizers as tok
from core.gpt.config import GPTConfig
from core.gpt.model import GPT
from core.lab import models, runs
from core.lab.tokenizer_files import ByteLevelBPE
from pages._ui.tokens import SPECIAL_STYLE
from tests.page_helpers import all_text

PAGE = "../pages/8_Chat.py"
SHARED = Path((os.environ.get("GLASSBOX_DATA_DIR") or "").split(os.pathsep)[0]
              or Path(__file__).resolve().parent.parent.parent / "shared" / "data")


def make_chat_run(run_id: str, context: int = 256) -> None:
    bpe = tok.train_bpe((SHARED / "the-verdict.txt").read_text(encoding="utf-8"), 400)
    ranks = {data: i + 3 for i, data in enumerate(bpe.token_bytes)}
    tokenizer = ByteLevelBPE("chatml-test", bpe.pattern, ranks,
                             {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}, eot_token="<|im_end|>")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=context, n_embd=32, n_head=2, n_layer=2))
    runs.create_run(run_id, "import", {"source": "test"})
    models.save_model_run(run_id, model, tokenizer)
    runs.write_status(run_id, "finished")


def test_without_chat_models_the_page_says_what_to_do():
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.run()
    assert not at.exception and "No chat model yet" in all_text(at)


def test_a_two_turn_conversation_streams_and_shows_its_prompt():
    make_chat_run("smol-like", context=512)
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.run()
    assert not at.exception
    assert "chatml" in all_text(at)
    at.chat_input[0].set_value("Hello there").run()
    assert not at.exception
    assert len(at.chat_message) == 2 and at.chat_message[0].name == "user"
    at.chat_input[0].set_value("And again?").run()
    assert not at.exception
    assert [m.name for m in at.chat_message] == ["user", "assistant", "user", "assistant"]
    metrics = {m.label: m.value for m in at.metric}
    assert "/ 512 tokens" in metrics["KV cache"] and "KiB" in metrics["KV cache memory"]
    at.toggle[0].set_value(True).run()
    prompt = at.code[0].value
    assert prompt.count("<|im_start|>") == 5 and "Hello there" in prompt and prompt.rstrip().endswith("<|im_start|>assistant")
    spans = [m.value for m in at.markdown if "<span" in m.value][0]
    assert spans.count(SPECIAL_STYLE) == prompt.count("<|im_start|>") + prompt.count("<|im_end|>")
    captions = [c.value for c in at.caption]
    assert any("core.gpt.chat.chatml_prompt" in c for c in captions)
    at.button(key="chat_measure").click().run()
    measured = [m.value for m in at.markdown if m.value.startswith("With the cache")]
    assert not at.exception and len(measured) == 1 and "without it" in measured[0]


def test_a_long_conversation_is_cut_with_a_visible_note():
    make_chat_run("short-memory", context=256)
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.run()
    for n in range(3):
        at.chat_input[0].set_value(f"message number {n} " * 3).run()
        assert not at.exception
    assert any("were cut" in i.value for i in at.info)


def test_a_reply_cut_by_stop_is_kept_and_marked():
    make_chat_run("stoppable")
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.session_state["chat_history_stoppable"] = [{"role": "user", "content": "Tell me a story"}]
    at.session_state["chat_partial"] = {"run": "stoppable", "text": "Once upon", "done": False}
    at.run()
    assert not at.exception
    assert [m.name for m in at.chat_message] == ["user", "assistant"]
    assert "Once upon" in all_text(at) and any("stopped" in c.value for c in at.caption)
    at.run()  # the cut reply is recorded once, not again on every rerun
    assert len(at.chat_message) == 2


def test_bad_sampling_settings_show_an_error_and_keep_the_conversation_clean():
    make_chat_run("strict")
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.run()
    at.number_input(key="chat_top_k").set_value(0).run()
    at.chat_input[0].set_value("Hello").run()
    assert not at.exception
    assert any("top-k" in e.value for e in at.error)
    assert at.session_state["chat_history_strict"] == []
