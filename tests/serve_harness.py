"""`serve`'s ASGI app on a free 127.0.0.1 port, in a thread of the test process (for the tests
that talk to it with the openai client or run stage 7 against it)."""

from __future__ import annotations

import contextlib
import threading
import time

from tests.fake_openai_server import free_port  # noqa: F401  (test_serve imports it from here too)


@contextlib.contextmanager
def serving(app, start_timeout: float = 30):
    """Yield the base URL (`http://127.0.0.1:PORT/v1`) while uvicorn serves `app`; stop it after."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)
