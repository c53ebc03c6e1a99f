"""A real HTTP server on 127.0.0.1 that speaks just enough of the OpenAI protocol for tests.

It answers `GET /v1/models` and `POST /v1/chat/completions` with scripted replies, so the judge
is tested through the real `openai` client, real sockets and real timeouts. Each reply is either
a string (the assistant's text in a 200 completion) or a dict:

    {"status": 429, "message": "slow down", "headers": {"retry-after": "2"}}   # an error
    {"content": "...", "delay": 1.0}                                          # a slow reply

Replies in `script` are used first, in order; after that `responder(request_body)` decides (or a
default good judgement). Every request is recorded in `.requests` (path, lower-cased headers, body).

`like="llama-cpp-python"` answers as `python -m llama_cpp.server` 0.3.36 does: its request model
takes `response_format` of type "text" or "json_object" (with an optional "schema") only, and its
route handler turns the validation error into HTTP **500** with an OpenAI-style body
(llama_cpp/server/errors.py: `{"error": {"message": str(exc), "type": "internal_server_error",
"param": null, "code": null}}`), the message being FastAPI's text for a pydantic literal error.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

GOOD_SINGLE = json.dumps({"criteria": {"correctness": 5, "instruction_following": 5, "completeness": 4,
                                       "concision": 5}, "score": 90, "rationale": "Correct and concise."})
GOOD_PAIRWISE = json.dumps({"winner": "A", "rationale": "A is correct."})


LLAMA_CPP_FORMATS = ("text", "json_object")


def llama_cpp_validation_error(given) -> dict:
    """The 500 body llama-cpp-python's server sends for `response_format.type` = json_schema."""
    error = {"type": "literal_error", "loc": ("body", "response_format", "type"),
             "msg": "Input should be 'text' or 'json_object'", "input": given,
             "ctx": {"expected": "'text' or 'json_object'"}}
    return {"error": {"message": f"1 validation error:\n  {error}\n", "type": "internal_server_error",
                      "param": None, "code": None}}


def free_port() -> int:
    """A port nothing listens on (bound, then released): also how tests get 'connection refused'."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def default_responder(body: dict):
    """A good judgement of whichever kind the prompt asks for."""
    text = json.dumps(body.get("messages", []))
    return GOOD_PAIRWISE if "Response A" in text else GOOD_SINGLE


class FakeOpenAIServer:
    def __init__(self, script=None, responder=None, models=("judge-model",), api_key=None,
                 reject_response_format=False, list_models=True, port=0, like=None):
        self.script = list(script or [])
        self.responder = responder or default_responder
        self.models = list(models)
        self.api_key = api_key
        self.reject_response_format = reject_response_format
        self.list_models = list_models
        self.port = port  # 0: any free port
        self.like = like  # None, or "llama-cpp-python": refuse formats exactly as that server does
        self.requests: list[dict] = []
        self._lock = threading.Lock()
        self._httpd = None
        self._thread = None

    # -- life cycle ---------------------------------------------------------------------------
    def start(self) -> "FakeOpenAIServer":
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def do_GET(self):
                server._handle(self, "GET")

            def do_POST(self):
                server._handle(self, "POST")

        self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self._httpd.daemon_threads = True
        self._httpd.block_on_close = False
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    @property
    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    # -- protocol -----------------------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler, method: str):
        length = int(handler.headers.get("content-length") or 0)
        raw = handler.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
        except json.JSONDecodeError:
            body = {}
        with self._lock:
            self.requests.append({"method": method, "path": handler.path,
                                  "headers": {k.lower(): v for k, v in handler.headers.items()}, "body": body})
        if self.api_key is not None:
            given = handler.headers.get("authorization", "")
            if given != f"Bearer {self.api_key}":
                # Like OpenAI, echo (part of) the key that was sent: the judge must not repeat it.
                return self._send(handler, 401, {"error": {
                    "message": f"Incorrect API key provided: {given.removeprefix('Bearer ')}",
                    "type": "invalid_request_error", "code": "invalid_api_key"}})
        if method == "GET" and handler.path.rstrip("/").endswith("/models"):
            if not self.list_models:
                return self._send(handler, 404, {"error": {"message": "not found"}})
            return self._send(handler, 200, {"object": "list", "data": [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]})
        if method != "POST" or not handler.path.rstrip("/").endswith("/chat/completions"):
            return self._send(handler, 404, {"error": {"message": f"no route {handler.path}"}})
        if body.get("model") not in self.models:
            return self._send(handler, 404, {"error": {
                "message": f"The model `{body.get('model')}` does not exist.", "code": "model_not_found"}})
        given = (body.get("response_format") or {}).get("type")
        if self.like == "llama-cpp-python" and "response_format" in body and given not in LLAMA_CPP_FORMATS:
            return self._send(handler, 500, llama_cpp_validation_error(given))
        # reject_response_format: True refuses any response_format; "json_schema" refuses only that
        # type (like llama-cpp-python's server, which takes {"type": "json_object", "schema": ...}).
        refused = self.reject_response_format
        if refused not in (False, True):
            refused = (body.get("response_format") or {}).get("type") == refused
        if refused and "response_format" in body:
            return self._send(handler, 400 if self.reject_response_format is True else 422, {"error": {
                "message": "response_format of this type is not supported by this server"}})
        with self._lock:
            reply = self.script.pop(0) if self.script else None
        if reply is None:
            reply = self.responder(body)
        if isinstance(reply, str):
            reply = {"content": reply}
        if reply.get("delay"):
            time.sleep(reply["delay"])
        status = reply.get("status", 200)
        if status != 200:
            payload = reply.get("body") or {"error": {"message": reply.get("message", "error")}}
            return self._send(handler, status, payload, reply.get("headers"))
        if "raw" in reply:  # a 200 whose body is given as it is (e.g. not a chat completion)
            return self._send_raw(handler, 200, reply["raw"])
        return self._send(handler, 200, {
            "id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": reply["content"]}}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20}})

    @staticmethod
    def _send(handler, status: int, payload: dict, headers: dict | None = None):
        FakeOpenAIServer._send_raw(handler, status, json.dumps(payload).encode("utf-8"), headers)

    @staticmethod
    def _send_raw(handler, status: int, data: bytes, headers: dict | None = None):
        try:
            handler.send_response(status)
            handler.send_header("content-type", "application/json")
            handler.send_header("content-length", str(len(data)))
            for name, value in (headers or {}).items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (a timeout test): nothing to do
