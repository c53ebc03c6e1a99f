"""An OpenAI-compatible server for one run: `/v1/models` and `/v1/chat/completions`.

The ecosystem's parts do the serving: Starlette (the ASGI framework) and uvicorn (the server);
JSON-schema replies are enforced by constrained decoding with `outlines-core` (its regex index says,
at each step, which token ids keep the text inside the schema). The lesson underneath is the
textbook's: a chat template (core/gpt/chat.py) and KV-cached generation, one token at a time.

- One generation at a time per model: requests wait in a first-come queue (`asyncio.Lock` is
  fair); past `max_queue` waiting, a request is refused with 429 instead of piling up.
- Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with a 4xx status
  for a bad request; the server goes on serving.
- An optional bearer token (`api_key`): every request must send `Authorization: Bearer <key>`.
- `stream: true` sends Server-Sent Events, `data: {chunk}` per piece of text, then `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import torch
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from core.gpt import chat
from core.gpt.errors import GlassBoxError
from core.gpt.generate import KVCache
from core.gpt.microscope import kv_cache_bytes
from core.lab import models

MAX_BODY_BYTES = 1_000_000
MAX_QUEUE = 16
DEFAULT_MAX_TOKENS = 256
MAX_STOP = 4


class RequestError(Exception):
    """A request the server refuses: an HTTP status and an OpenAI-style error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.param, self.code, self.kind)


def error_response(status: int, message: str, param=None, code=None, kind="invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status)


# ---------------------------------------------------------------------------- the request


@dataclass
class ChatRequest:
    messages: list[dict]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    schema: dict | None = None  # the JSON schema the reply must follow (response_format)


def _number(body, name, low, high, default, integer=False, low_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not math.isfinite(value) or value > high \
            or value < low or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise RequestError(400, f"'{name}' must be {'an integer' if integer else 'a number'} in {bound}, "
                                f"not {value!r}.", name, "invalid_value")
    return value


def _content(message, n: int) -> str:
    content = message.get("content")
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            raise RequestError(400, f"messages[{n}].content: only text parts are supported.",
                               f"messages[{n}].content")
        return "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(400, f"messages[{n}].content must be text.", f"messages[{n}].content")
    return content


def _messages(body) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list of {role, content} objects.", "messages")
    out = []
    for n, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(400, f"messages[{n}] must be an object with a 'role'.", f"messages[{n}]")
        role = "system" if m["role"] == "developer" else m["role"]
        if role not in chat.ROLES:
            raise RequestError(400, f"messages[{n}].role {m['role']!r} is not system, user or assistant.",
                               f"messages[{n}].role")
        out.append({"role": role, "content": _content(m, n)})
    if out[-1]["role"] != "user":
        raise RequestError(400, "The last message must be the user's: the model answers it.", "messages")
    return out


def _schema(body) -> dict | None:
    fmt = body.get("response_format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":  # llama.cpp's spelling may carry a schema; else any JSON object
        schema = fmt.get("schema", {"type": "object"})
    elif kind == "json_schema" and isinstance(fmt.get("json_schema"), dict):
        schema = fmt["json_schema"].get("schema")
    else:
        raise RequestError(400, "response_format.type must be 'text', 'json_object' or 'json_schema' "
                                "(with json_schema.schema).", "response_format")
    if not isinstance(schema, dict):
        raise RequestError(400, "The response_format's schema must be a JSON object.", "response_format")
    return schema


def parse_request(body, served: str, context_length: int) -> ChatRequest:
    """Check every field we use; a bad one raises RequestError naming it."""
    if not isinstance(body, dict):
        raise RequestError(400, "The request body must be a JSON object.")
    if body.get("model") != served:
        raise RequestError(404, f"The model {body.get('model')!r} does not exist here; this server has "
                                f"{served!r}.", "model", "model_not_found")
    if body.get("n", 1) != 1:
        raise RequestError(400, "Only n = 1 is supported.", "n", "invalid_value")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > MAX_STOP or not all(isinstance(s, str) for s in stop):
        raise RequestError(400, f"'stop' must be a string or a list of at most {MAX_STOP} strings.", "stop")
    if not isinstance(body.get("stream", False), bool):
        raise RequestError(400, "'stream' must be true or false.", "stream")
    options = body.get("stream_options") or {}
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    return ChatRequest(
        messages=_messages(body),
        max_tokens=_number({name: max_tokens}, name, 1, context_length, None, integer=True),
        temperature=_number(body, "temperature", 0, 2, 1.0),
        top_p=_number(body, "top_p", 0, 1, None, low_open=True),
        top_k=_number(body, "top_k", 1, 1_000_000, None, integer=True),
        stop=tuple(s for s in stop if s), seed=_number(body, "seed", -2**63, 2**64 - 1, None, integer=True),
        stream=body.get("stream", False), include_usage=bool(isinstance(options, dict)
                                                             and options.get("include_usage")),
        schema=_schema(body))


# ---------------------------------------------------------------------------- constrained decoding


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The raw bytes a token stands for (byte-level tokenisers), or its text as UTF-8."""
    if hasattr(tokenizer, "encoding"):
        return tokenizer.encoding.decode_single_token_bytes(token_id)
    if hasattr(tokenizer, "token_bytes") and token_id < len(tokenizer.token_bytes):
        return tokenizer.token_bytes[token_id]
    return tokenizer.token_text(token_id).encode("utf-8")


class JsonConstraint:
    """Which tokens may come next so that the reply stays inside a JSON schema (outlines-core)."""

    def __init__(self, guide, eos_id: int):
        self.guide, self.eos_id = guide, eos_id

    def allowed(self) -> list[int]:
        return list(self.guide.get_tokens())

    def advance(self, token_id: int) -> None:
        if token_id != self.eos_id:
            self.guide.advance(token_id)

    @property
    def finished(self) -> bool:
        return self.guide.is_finished()


MAX_ENUM = 1000


def bounded(schema):
    """The schema with each small integer range (minimum..maximum, at most 1,000 values) also
    written as an `enum`: outlines-core's integer regex ignores minimum and maximum, and a
    decoder would otherwise happily write 9999999999… into a 1-5 score."""
    if isinstance(schema, list):
        return [bounded(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: bounded(v) for k, v in schema.items()}
    low, high = out.get("minimum"), out.get("maximum")
    if out.get("type") == "integer" and "enum" not in out and all(type(v) is int for v in (low, high)) \
            and 0 <= high - low < MAX_ENUM:
        out["enum"] = list(range(low, high + 1))
    return out


def schema_regex(schema: dict) -> str:
    """The regular expression outlines-core builds for a JSON schema (whitespace: one space at most)."""
    try:
        from outlines_core.json_schema import build_regex_from_schema  # optional: only JSON replies need it
    except ImportError:
        raise RequestError(400, "This server cannot enforce a JSON schema: the package 'outlines-core' "
                                "is not installed.", "response_format") from None
    try:
        return build_regex_from_schema(json.dumps(bounded(schema)), whitespace_pattern=r"[ ]?")
    except (ValueError, TypeError, RuntimeError) as e:
        raise RequestError(400, f"The JSON schema cannot be enforced: {e}", "response_format") from None


# ---------------------------------------------------------------------------- one served model


@dataclass
class Engine:
    """A model, its tokenizer and chat template, and the queue that lets one generation run at a time."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    template: chat.Template = None
    created: int = field(default_factory=lambda: int(time.time()))
    max_queue: int = MAX_QUEUE

    def __post_init__(self):
        self.template = self.template or chat.template_for(self.tokenizer)
        self.stop_ids = chat.stop_ids(self.tokenizer, self.template)
        first = self.tokenizer.encode(self.template.stop[0])  # the end-of-turn marker, e.g. <|im_end|>
        self.eos_id = first[0] if len(first) == 1 and first[0] in self.stop_ids else self.tokenizer.eot_id
        self.context_length = self.model.config.context_length
        self.lock = asyncio.Lock()
        self.waiting = 0
        self._vocabulary = None
        self._indexes: dict[str, object] = {}

    @classmethod
    def from_run(cls, run_id: str, **kw) -> "Engine":
        model, tokenizer, _ = models.load_model_run(run_id)
        return cls(run_id, model, tokenizer, **kw)

    def prompt(self, messages: list[dict], max_tokens: int) -> tuple[list[int], int]:
        """Prompt ids of the conversation cut to leave `max_tokens` of the context window."""
        count = lambda kept: len(self.tokenizer.encode(self.template.render(kept)))  # noqa: E731
        try:
            kept, dropped = chat.fit_to_context(messages, count, self.context_length - max_tokens)
        except chat.ChatError as e:
            raise RequestError(400, str(e), "messages", "context_length_exceeded") from None
        return self.tokenizer.encode(self.template.render(kept)), dropped

    def max_tokens(self, request: ChatRequest) -> int:
        return request.max_tokens or min(DEFAULT_MAX_TOKENS, self.context_length // 2)

    def check(self, request: ChatRequest) -> None:
        """Refuse, before any reply starts, a conversation that cannot fit or a schema that cannot
        be enforced (a stream that has begun can no longer answer with a 4xx)."""
        self.prompt(request.messages, self.max_tokens(request))
        if request.schema is not None:
            schema_regex(request.schema)

    def constraint(self, schema: dict) -> JsonConstraint:
        import outlines_core  # optional: only JSON-schema replies need it (schema_regex checked it is here)

        key = json.dumps(schema)
        if key not in self._indexes:
            regex = schema_regex(schema)
            if self._vocabulary is None:
                table: dict[bytes, list[int]] = {}
                specials = self.tokenizer.special_ids()
                for i in range(self.tokenizer.vocab_size):
                    if i not in specials:
                        try:
                            table.setdefault(token_bytes(self.tokenizer, i), []).append(i)
                        except (KeyError, GlassBoxError):
                            continue  # an unused id
                self._vocabulary = outlines_core.Vocabulary(self.eos_id, table)
            if len(self._indexes) >= 8:
                self._indexes.pop(next(iter(self._indexes)))
            self._indexes[key] = outlines_core.Index(regex, self._vocabulary)
        return JsonConstraint(outlines_core.Guide(self._indexes[key]), self.eos_id)

    def replies(self, request: ChatRequest, cancel: threading.Event | None = None,
                stats: dict | None = None) -> Iterator[str]:
        """The reply, piece by piece, as it is generated. `stats` (a dict) is kept up to date:
        tokens, KV-cache length and bytes, time to first token, tokens/s, finish reason."""
        stats = {} if stats is None else stats
        max_tokens = self.max_tokens(request)
        ids, dropped = self.prompt(request.messages, max_tokens)
        constraint = self.constraint(request.schema) if request.schema is not None else None
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed % 2**63)
        stream = chat.TextStream(self.tokenizer, self.template.stop + request.stop)
        cache = KVCache(self.model.config, 1, self.model.wte.weight.device, self.model.wte.weight.dtype)
        stats.update(prompt_tokens=len(ids), completion_tokens=0, finish_reason="length", dropped_messages=dropped,
                     seed=seed, context_length=self.context_length, time_to_first_token_s=None, tokens_per_s=None)
        started = time.perf_counter()
        with models.generation_threads(self.model):
            for token in chat.stream_reply(self.model, ids, max_tokens, request.temperature, request.top_k,
                                           request.top_p, self.stop_ids, generator,
                                           constraint.allowed if constraint else None, cache):
                _count(stats, started, cache)
                if token in self.stop_ids:
                    stats["finish_reason"] = "stop"
                    break
                if constraint is not None:
                    constraint.advance(token)
                yield stream.push(token)
                if stream.stopped or (constraint is not None and constraint.finished):
                    stats["finish_reason"] = "stop"
                    break
                if cancel is not None and cancel.is_set():
                    stats["finish_reason"] = "cancelled"
                    break
        yield stream.finish()
        stats["seconds"] = round(time.perf_counter() - started, 4)

    def generate(self, request: ChatRequest, emit, cancel: threading.Event) -> dict:
        """Run one reply (in the server's worker thread), calling `emit(text)` for each piece."""
        stats: dict = {}
        for piece in self.replies(request, cancel, stats):
            emit(piece)
        return stats


def _count(stats: dict, started: float, cache: KVCache) -> None:
    """One more token: its timing, and what the KV cache now holds."""
    now = time.perf_counter() - started
    stats["completion_tokens"] += 1
    if stats["time_to_first_token_s"] is None:
        stats["time_to_first_token_s"] = round(now, 4)
    elif now > stats["time_to_first_token_s"]:
        stats["tokens_per_s"] = round((stats["completion_tokens"] - 1) / (now - stats["time_to_first_token_s"]), 2)
    stats["kv_cache_tokens"] = cache.length
    stats["kv_cache_bytes"] = kv_cache_bytes(cache)


# ---------------------------------------------------------------------------- the HTTP side


async def _read_json(request: Request, limit: int):
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise RequestError(413, f"The request body is over the {limit:,}-byte limit.", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise RequestError(413, f"The request body is over the {limit:,}-byte limit.", code="body_too_large")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise RequestError(400, "The request body is not valid JSON.") from None


def _check_key(request: Request, api_key: str | None) -> None:
    if not api_key:
        return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise RequestError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")


def _chunk(base: dict, delta: dict, finish=None, **extra) -> str:
    payload = {**base, "object": "chat.completion.chunk",
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}], **extra}
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _usage(stats: dict) -> dict:
    return {"prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
            "total_tokens": stats["prompt_tokens"] + stats["completion_tokens"]}


async def _run_in_thread(engine: Engine, request: ChatRequest, queue: asyncio.Queue, cancel):
    """The generation in a worker thread; each piece of text (then the stats, or the error) is
    put on `queue` from that thread, safely, through the event loop."""
    loop = asyncio.get_running_loop()

    def emit(text):
        if text:
            loop.call_soon_threadsafe(queue.put_nowait, ("text", text))

    def work():
        try:
            stats = engine.generate(request, emit, cancel)
            loop.call_soon_threadsafe(queue.put_nowait, ("done", stats))
        except BaseException as e:  # handed to the request, which answers with an error object
            loop.call_soon_threadsafe(queue.put_nowait, ("error", e))

    return loop.run_in_executor(None, work)


def _error_of(exc) -> RequestError:
    if isinstance(exc, RequestError):
        return exc
    if isinstance(exc, GlassBoxError):
        return RequestError(400, str(exc))
    return RequestError(500, f"The server failed: {type(exc).__name__}: {exc}", kind="server_error")


def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = MAX_BODY_BYTES) -> Starlette:
    """The ASGI app serving `engine` (run it with uvicorn)."""

    async def list_models(request: Request):
        _check_key(request, api_key)
        return JSONResponse({"object": "list", "data": [
            {"id": engine.name, "object": "model", "created": engine.created, "owned_by": "glassbox"}]})

    async def completions(request: Request):
        _check_key(request, api_key)
        req = parse_request(await _read_json(request, max_body_bytes), engine.name, engine.context_length)
        engine.check(req)
        if engine.waiting >= engine.max_queue:
            raise RequestError(429, f"{engine.waiting} requests are already waiting: try again soon.",
                               code="queue_full", kind="rate_limit_error")
        engine.waiting += 1
        try:
            await engine.lock.acquire()
        finally:
            engine.waiting -= 1
        base = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": engine.name}
        queue, cancel = asyncio.Queue(), threading.Event()
        try:
            job = await _run_in_thread(engine, req, queue, cancel)
        except BaseException:
            engine.lock.release()
            raise
        # The next request may start when this generation's thread has ended, however the client
        # left (a stream's generator is not always closed when the client hangs up).
        job.add_done_callback(lambda _: engine.lock.release())
        if req.stream:
            return StreamingResponse(_events(req, base, queue, cancel), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                                     background=BackgroundTask(cancel.set))
        try:
            text, stats = await _collect(queue)
        finally:
            cancel.set()  # a client that went away stops the generation
        return JSONResponse({**base, "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": stats["finish_reason"],
             "logprobs": None}], "usage": _usage(stats), "glassbox": stats})

    async def not_found(request: Request, exc: HTTPException):
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                              code="not_found" if exc.status_code == 404 else None)

    async def refused(request: Request, exc: RequestError):
        return exc.response()

    async def failed(request: Request, exc: Exception):
        return _error_of(exc).response()

    return Starlette(routes=[Route("/v1/models", list_models, methods=["GET"]),
                             Route("/v1/chat/completions", completions, methods=["POST"])],
                     exception_handlers={HTTPException: not_found, RequestError: refused, Exception: failed})


async def _collect(queue: asyncio.Queue) -> tuple[str, dict]:
    parts = []
    while True:
        kind, value = await queue.get()
        if kind == "text":
            parts.append(value)
        elif kind == "done":
            return "".join(parts), value
        else:
            raise _error_of(value)


async def _events(req, base, queue, cancel):
    """The SSE stream of one reply; a client that goes away stops the generation."""
    try:
        yield _chunk(base, {"role": "assistant", "content": ""})
        while True:
            kind, value = await queue.get()
            if kind == "text":
                yield _chunk(base, {"content": value})
            elif kind == "done":
                yield _chunk(base, {}, value["finish_reason"], glassbox=value)
                if req.include_usage:
                    yield f"data: {json.dumps({**base, 'object': 'chat.completion.chunk', 'choices': [], 'usage': _usage(value)})}\n\n"
                break
            else:
                error = _error_of(value)
                yield f"data: {json.dumps({'error': {'message': error.message, 'type': error.kind, 'param': error.param, 'code': error.code}})}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()


# ---------------------------------------------------------------------------- a bounded loopback load test


def _stream_once(url: str, body: dict, key: str | None, timeout: float) -> dict:
    """One streamed request over loopback: seconds to the first text, tokens, total seconds."""
    import urllib.request  # only the load test talks HTTP from this side

    request = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    started, first, stats = time.perf_counter(), None, {}
    with urllib.request.urlopen(request, timeout=timeout) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - started
            stats = chunk.get("glassbox", stats)
    return {"ttft_s": first, "seconds": time.perf_counter() - started, "tokens": stats.get("completion_tokens", 0),
            "server_tokens_per_s": stats.get("tokens_per_s")}


def load_test(engine: Engine, clients: int = 4, requests_per_client: int = 2, max_tokens: int = 32,
              timeout: float = 300.0, alone_runs: int = 3) -> dict:
    """Serve `engine` on a free 127.0.0.1 port, then time one client alone and `clients` at once
    (bounded: clients x requests_per_client requests of `max_tokens` tokens, loopback only)."""
    import socket  # only the load test needs a port
    import uvicorn  # (as above)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    body = {"model": engine.name, "messages": [{"role": "user", "content": "Tell me about the sea."}],
            "max_tokens": max_tokens, "temperature": 0.8, "seed": 0}
    try:
        _stream_once(url, body, None, timeout)  # warm-up
        alone = [_stream_once(url, {**body, "seed": n}, None, timeout) for n in range(alone_runs)]
        results: list[dict] = []

        def client(n):
            for r in range(requests_per_client):
                results.append(_stream_once(url, {**body, "seed": 100 * n + r}, None, timeout))

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - started
    finally:
        server.should_exit = True
        thread.join(10)
    alone.sort(key=lambda r: r["ttft_s"] or 0)
    middle = alone[len(alone) // 2]
    return {"model": engine.name, "parameters": sum(p.numel() for p in engine.model.parameters()),
            "max_tokens": max_tokens, "ttft_s": round(middle["ttft_s"] or 0, 3),
            "tokens_per_s_alone": middle["server_tokens_per_s"],
            "clients": clients, "requests": len(results), "tokens": sum(r["tokens"] for r in results),
            "wall_s": round(wall, 2), "throughput_tokens_per_s": round(sum(r["tokens"] for r in results) / wall, 2),
            "worst_request_s": round(max(r["seconds"] for r in results), 2)}
