"""Stage 8, chat: talk to an instruction-tuned, DPO or imported model, and see what a chat is to it.

The page shows the conversation as the model sees it (one prompt, built by the run's chat
template, special tokens and all), streams the reply token by token through the KV cache, and
measures the cache and the speed. The same engine serves the OpenAI-compatible API
(`python -m core serve --run ID`).
"""

from __future__ import annotations

from core.gpt import chat
from core.gpt.errors import GlassBoxError
from core.gpt.microscope import seconds_per_token
from core.lab import runs, serve

CHAT_STAGES = ("instruct", "prefer", "import")  # runs that learnt (or came with) a chat format
Engine, ChatRequest, RequestError = serve.Engine, serve.ChatRequest, serve.RequestError
__all__ = ["GlassBoxError"]  # re-exported for the page


def chat_runs() -> list[str]:
    """Runs holding a whole language model that was taught to answer, newest first."""
    return [r.id for r in runs.list_runs(CHAT_STAGES)
            if not r.error and "model" in r.config and r.has_weights()]


def open_engine(run_id: str) -> serve.Engine:
    return serve.Engine.from_run(run_id)


def prompt_view(engine: serve.Engine, messages: list[dict], max_tokens: int) -> dict:
    """What the model will read: the prompt text, its ids, and how many old messages were cut."""
    try:
        ids, dropped = engine.prompt(chat.check_messages(messages), max_tokens)
    except serve.RequestError as e:
        raise chat.ChatError(e.message) from None
    return {"text": engine.tokenizer.decode(ids), "ids": ids, "dropped": dropped,
            "template": engine.template.name, "context_length": engine.context_length}


def reply(engine: serve.Engine, messages: list[dict], stats: dict, temperature: float = 0.7,
          top_k: int | None = None, top_p: float | None = None, max_tokens: int = 128, seed: int | None = None):
    """The reply's text, piece by piece (for st.write_stream); `stats` fills in as it goes."""
    request = serve.ChatRequest(messages=chat.check_messages(messages), max_tokens=max_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    try:
        yield from engine.replies(request, stats=stats)
    except serve.RequestError as e:
        raise chat.ChatError(e.message) from None


def speed_with_and_without_cache(engine: serve.Engine, prompt_ids: list[int], n_tokens: int = 8) -> dict:
    """Tokens per second of greedy decoding after this prompt, with the KV cache and without it."""
    ids = prompt_ids[-(engine.context_length - n_tokens):]
    with_cache = seconds_per_token(engine.model, ids, n_tokens, use_cache=True)
    without = seconds_per_token(engine.model, ids, n_tokens, use_cache=False)
    return {"with_cache": 1 / with_cache, "without_cache": 1 / without}


CODE = {"chatml": [chat.chatml_prompt], "alpaca": [chat.alpaca_prompt],
        "context": [chat.fit_to_context], "generation": [chat.stream_reply, chat.TextStream.push]}


def weights_stamp(run_id: str) -> float:
    """Changes when the run's weights change (a cache key for the loaded model)."""
    weights = runs.open_run(run_id).file("model.safetensors")
    return weights.stat().st_mtime if weights.is_file() else 0.0
