"""Chat: a conversation is one long prompt, and a reply is generation that stops at a marker.

A language model only continues text. To "chat" with it, the conversation so far is written out in
the exact format the model was fine-tuned on (its *chat template*), ending where the assistant's
turn begins; the model continues from there, and we stop when it writes the end-of-turn marker.

- `alpaca_prompt`: the template our stage-6 runs learnt (core/gpt/instruct.py, "### Instruction:"
  ... "### Response:"), earlier turns written out before the new one.
- `chatml_prompt`: SmolLM2's template, `<|im_start|>role\\ncontent<|im_end|>\\n` per message; the
  markers are *special tokens*, one id each, that never occur in ordinary text.
- `fit_to_context`: a conversation longer than the context window loses its oldest turns (and
  says how many), never silently.
- `stream_reply`: KV-cached generation one token at a time, with an optional `allowed` hook that
  narrows the next token's choice (constrained decoding for JSON replies).
- `TextStream`: turns those tokens into text as they come, holding back half characters and
  anything that might be the start of a stop string.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from core.gpt.errors import GlassBoxError
from core.gpt.generate import KVCache, check_sampling, next_logits, sample_next_token
from core.gpt.instruct import END_OF_TEXT, PROMPT_INTRO, RESPONSE_MARKER, format_prompt

ROLES = ("system", "user", "assistant")
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


class ChatError(GlassBoxError):
    """A conversation that cannot be turned into a prompt (bad roles, nothing to answer, no room)."""


def check_messages(messages) -> list[dict]:
    """A list of {"role", "content"} with known roles and text content, ending with the user."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("A conversation is a non-empty list of messages.")
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ChatError(f"Message {n} must be {{'role': one of {', '.join(ROLES)}, 'content': text}}.")
    if messages[-1]["role"] != "user":
        raise ChatError("The last message must be the user's: the model answers it.")
    return messages


# ---------------------------------------------------------------------------- 1. chat templates


def alpaca_prompt(messages: list[dict]) -> str:
    """Our instruction runs' template. Earlier turns are written as the finished examples the
    model was trained on (prompt + answer + <|endoftext|>); the last turn ends at "### Response:".
    (Alpaca has no system role: a system message is left out.)"""
    prompt, question = "", None
    for m in (m for m in messages if m["role"] != "system"):
        if m["role"] == "user":
            question = m["content"]
            continue
        prompt += format_prompt({"instruction": question or "", "input": ""}) + m["content"] + END_OF_TEXT
        question = None
    return prompt + format_prompt({"instruction": question or "", "input": ""})


def chatml_prompt(messages: list[dict], default_system: str = SMOLLM2_SYSTEM) -> str:
    """SmolLM2's template (its tokenizer_config.json, written out): a system message first (the
    default one when the conversation has none), each message between <|im_start|> and <|im_end|>,
    then the opening of the assistant's turn."""
    if messages[0]["role"] != "system" and default_system:
        messages = [{"role": "system", "content": default_system}] + messages
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + "<|im_start|>assistant\n"


@dataclass(frozen=True)
class Template:
    name: str
    render: Callable[[list[dict]], str]
    stop: tuple[str, ...]  # text that ends the assistant's turn (kept out of the reply)


TEMPLATES = {
    "alpaca": Template("alpaca", alpaca_prompt, (END_OF_TEXT, "### Instruction", "### Input", RESPONSE_MARKER,
                                                 PROMPT_INTRO[:30])),
    "chatml": Template("chatml", chatml_prompt, ("<|im_end|>", "<|im_start|>", END_OF_TEXT)),
}


def template_for(tokenizer) -> Template:
    """ChatML when the vocabulary has <|im_start|> as a special token (SmolLM2), else Alpaca."""
    ids = tokenizer.encode("<|im_start|>")
    return TEMPLATES["chatml" if len(ids) == 1 and ids[0] in tokenizer.special_ids() else "alpaca"]


def stop_ids(tokenizer, template: Template) -> set[int]:
    """The stop strings that are single special tokens: generation ends on their ids."""
    found = set()
    for text in template.stop:
        ids = tokenizer.encode(text)
        if len(ids) == 1 and ids[0] in tokenizer.special_ids():
            found.add(ids[0])
    return found


# ---------------------------------------------------------------------------- 2. the context window


def fit_to_context(messages: list[dict], count_tokens: Callable[[list[dict]], int],
                   budget: int) -> tuple[list[dict], int]:
    """Drop the oldest turns (never the system message, never the last question) until the prompt
    has at most `budget` tokens. Returns (kept messages, how many were dropped)."""
    system = [m for m in messages if m["role"] == "system"][:1]
    rest = [m for m in messages if m not in system]
    dropped = 0
    while len(rest) > 1 and count_tokens(system + rest) > budget:
        rest = rest[1:]
        dropped += 1
        while len(rest) > 1 and rest[0]["role"] != "user":  # a turn starts with the user
            rest, dropped = rest[1:], dropped + 1
    if count_tokens(system + rest) > budget:
        raise ChatError(f"The last message, written in the chat template, is longer than the {budget} "
                        "tokens the context window leaves for the prompt: shorten it.")
    return system + rest, dropped


# ---------------------------------------------------------------------------- 3. generation, streamed


@torch.inference_mode()
def stream_reply(model, prompt_ids: list[int], max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, top_p: float | None = None, stop: set[int] = frozenset(),
                 generator: torch.Generator | None = None,
                 allowed: Callable[[], list[int]] | None = None, cache: KVCache | None = None) -> Iterator[int]:
    """Yield new token ids one at a time, as they are chosen. The prompt is read once (prefill);
    each step then feeds only the newest token, the rest comes from the KV cache. `allowed()` may
    return the ids permitted next (all others get probability 0). Ends after a `stop` id."""
    check_sampling(temperature, top_k, top_p)
    model.eval()
    weight = model.wte.weight
    if cache is None:
        cache = KVCache(model.config, 1, weight.device, weight.dtype)
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=weight.device)
    for _ in range(max_new_tokens):
        logits, cache = next_logits(model, idx, cache)  # (1, V); the cache is dropped past the window
        if allowed is not None:
            keep = torch.full_like(logits, float("-inf"))
            keep[0, torch.tensor(allowed(), dtype=torch.long, device=logits.device)] = 0.0
            logits = logits + keep
        token = int(sample_next_token(logits, temperature, top_k, top_p, generator)[0, 0])
        yield token
        if token in stop:
            return
        idx = torch.cat((idx, torch.tensor([[token]], device=idx.device)), dim=1)


class TextStream:
    """Token ids in, text out, as it becomes certain. A byte-level token may be half a character
    (shown only when the next completes it), and text that could be the start of a stop string is
    held back until it is clearly not one. After a stop string, `stopped` is True."""

    def __init__(self, tokenizer, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = 0  # characters of the text already given out
        self.stopped = False

    def _text(self) -> str:
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return text[:cut]
        return text

    def push(self, token_id: int) -> str:
        """Add one token; return the new text that is safe to show now."""
        self.ids.append(int(token_id))
        text = self._text()
        if self.stopped:
            return self._give(text)
        safe = len(text.rstrip("\ufffd"))  # a half character waits for its other bytes
        for s in self.stop:  # hold back a tail that a stop string could begin with
            for k in range(min(len(s) - 1, safe), 0, -1):
                if text[:safe].endswith(s[:k]):
                    safe = min(safe, len(text[:safe]) - k)
                    break
        return self._give(text[:safe])

    def finish(self) -> str:
        """Whatever is left when generation ends (held-back text that turned out not to be a stop)."""
        return "" if self.stopped else self._give(self._text())

    def _give(self, text: str) -> str:
        new = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return new

    @property
    def text(self) -> str:
        return self._text() if self.stopped else self.tokenizer.decode(self.ids)
