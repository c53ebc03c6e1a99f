"""`python -m core serve --run ID`: talk to a run through the OpenAI chat-completions API.

Any OpenAI client (the `openai` package, stage 7's judge, an editor plugin) can then use the
model: `/v1/models`, `/v1/chat/completions` with and without streaming, JSON-schema replies.
It listens on 127.0.0.1 (this machine only) unless told otherwise.

    python -m core serve --run my-instruct --port 8000 --api-key-env GLASSBOX_API_KEY
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import uvicorn

from core.gpt.errors import GlassBoxError
from core.lab import serve as server
from core.lab.cli import option
from core.lab.errors import RunError

COMMAND = "serve"


class ServeError(GlassBoxError):
    """The server cannot start as asked."""


@dataclass
class Settings:
    run: str = option(help="the run to serve (an instruction-tuned, DPO or imported model)", metavar="ID")
    host: str = option("127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    port: int = option(8000, help="port to listen on (default 8000)", metavar="P")
    api_key_env: str | None = option(None, metavar="NAME",
                                     help="environment variable holding a bearer token clients must send")

    def __post_init__(self):
        if not isinstance(self.run, str) or not self.run:
            raise ServeError("Name the run to serve with --run ID.")
        if not isinstance(self.port, int) or not 1 <= self.port <= 65535:
            raise ServeError(f"--port must be between 1 and 65535, not {self.port!r}.")


def api_key(settings: Settings) -> str | None:
    """The bearer token from the named environment variable (never from the command line)."""
    if settings.api_key_env is None:
        return None
    key = os.environ.get(settings.api_key_env, "")
    if not key:
        raise ServeError(f"--api-key-env {settings.api_key_env}: that environment variable is empty or unset.")
    return key


def app_for(settings: Settings):
    """The ASGI app for `settings` (what `run` serves; tests drive it in-process)."""
    try:
        engine = server.Engine.from_run(settings.run)
    except RunError as e:
        raise ServeError(f"Cannot serve {settings.run!r}: {e}") from None
    return server.create_app(engine, api_key=api_key(settings)), engine


def print_progress(record: dict) -> None:
    print(record["message"], file=sys.stderr, flush=True)


def run(settings: Settings, progress=None) -> dict:
    """Serve until interrupted (Ctrl-C); return what was served."""
    app, engine = app_for(settings)
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level="warning",
                            timeout_graceful_shutdown=5)
    instance = uvicorn.Server(config)
    if progress is not None:
        where = "this machine only" if settings.host in ("127.0.0.1", "localhost", "::1") else "the network"
        progress({"message": f"serving {engine.name} ({engine.template.name} template) on "
                             f"http://{settings.host}:{settings.port}/v1 ({where}); Ctrl-C stops"})
    instance.run()
    return {"run_id": engine.name, "host": settings.host, "port": settings.port,
            "template": engine.template.name}


CODE = {"template": [server.chat.chatml_prompt, server.chat.alpaca_prompt],
        "generation": [server.chat.stream_reply]}
