"""`serve`: the official `openai` client against our server (streaming and not), JSON-schema
replies that parse against the schema, OpenAI-style 4xx errors that leave the server serving, a
bearer token, one generation at a time, and the stage's command line."""

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import jsonschema
import openai
import pytest
import torch

from core.gpt import tokenizers as tok
from core.gpt.config import GPTConfig
from core.gpt.model import GPT
from core.lab import models, runs, serve
from core.lab.tokenizer_files import ByteLevelBPE
from core.stages import serve as serve_stage
from tests.serve_harness import free_port, serving

REPO = Path(__file__).resolve().parent.parent
SHARED = Path((os.environ.get("GLASSBOX_DATA_DIR") or "").split(os.pathsep)[0] or REPO.parent / "shared" / "data")
KEY = "test-key-123"
HELLO = [{"role": "user", "content": "Say hello."}]
SCHEMA = {"type": "object", "properties": {"score": {"type": "integer", "enum": [1, 2, 3, 4, 5]},
                                           "reason": {"type": "string", "maxLength": 24}},
          "required": ["score", "reason"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    bpe = tok.train_bpe((SHARED / "the-verdict.txt").read_text(encoding="utf-8"), 400)
    return ByteLevelBPE.from_bpe(bpe)


def tiny_model(tokenizer) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=256, n_embd=32, n_head=2, n_layer=2)).eval()


@pytest.fixture(scope="module")
def server(tokenizer):
    """One server for the module, on a free loopback port, with a bearer token."""
    engine = serve.Engine("tiny", tiny_model(tokenizer), tokenizer)
    with serving(serve.create_app(engine, api_key=KEY, max_body_bytes=50_000)) as url:
        yield {"engine": engine, "url": url}


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server["url"], api_key=KEY, max_retries=0, timeout=60)


def streamed_text(client, **kw) -> tuple[str, list]:
    chunks = list(client.chat.completions.create(stream=True, **kw))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


def test_models_lists_the_run(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_streaming_text_equals_the_non_streaming_text_for_a_seed(client):
    for seed in (1, 2, 3):
        kw = dict(model="tiny", messages=HELLO, max_tokens=24, seed=seed, temperature=1.0, top_p=0.95)
        whole = client.chat.completions.create(**kw)
        text, chunks = streamed_text(client, **kw)
        assert text == whole.choices[0].message.content and text
        assert whole.usage.completion_tokens == 24 and whole.choices[0].finish_reason == "length"
        assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 3
    other = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, seed=4)
    assert other.choices[0].message.content != whole.choices[0].message.content


def test_a_stop_string_ends_the_reply_before_it(client):
    kw = dict(model="tiny", messages=HELLO, max_tokens=30, seed=7, temperature=1.0)
    full = client.chat.completions.create(**kw).choices[0].message.content
    stop = full[len(full) // 2: len(full) // 2 + 3]
    cut = client.chat.completions.create(stop=[stop], **kw)
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert streamed_text(client, stop=stop, **kw)[0] == full[: full.index(stop)]


@pytest.mark.parametrize("kind", ["json_schema", "json_object"])
def test_a_schema_constrained_reply_parses_against_the_schema(client, kind):
    fmt = ({"type": "json_schema", "json_schema": {"name": "score", "schema": SCHEMA, "strict": True}}
           if kind == "json_schema" else {"type": "json_object", "schema": SCHEMA})  # llama.cpp's spelling
    for seed in range(4):
        reply = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=60, seed=seed,
                                               temperature=1.0, response_format=fmt)
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMA)
    text, _ = streamed_text(client, model="tiny", messages=HELLO, max_tokens=60, seed=0, response_format=fmt)
    jsonschema.validate(json.loads(text), SCHEMA)


def post(url, body: bytes, key=KEY) -> tuple[int, dict]:
    request = urllib.request.Request(url + "/chat/completions", data=body, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {key}"} if key else {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


GOOD = {"model": "tiny", "messages": HELLO, "max_tokens": 4}


@pytest.mark.parametrize("change, status, words", [
    ({"model": "gpt-9"}, 404, "does not exist"),
    ({"max_tokens": -1}, 400, "max_tokens"),
    ({"max_tokens": 10_000}, 400, "max_tokens"),
    ({"messages": "hello"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    ({"temperature": -1}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ({"n": 3}, 400, "n = 1"),
    ({"response_format": {"type": "yaml"}}, 400, "response_format"),
    ({"messages": [{"role": "user", "content": "x" * 60_000}]}, 413, "limit"),
])
def test_bad_requests_get_an_openai_error_and_the_server_keeps_serving(server, change, status, words):
    code, body = post(server["url"], json.dumps({**GOOD, **change}).encode())
    assert code == status
    assert set(body["error"]) >= {"message", "type", "param", "code"} and words in body["error"]["message"]
    assert post(server["url"], json.dumps(GOOD).encode())[0] == 200


def test_not_json_and_bearer_tokens(server):
    assert post(server["url"], b"{not json")[0] == 400
    for key in (None, "wrong"):
        code, body = post(server["url"], json.dumps(GOOD).encode(), key=key)
        assert code == 401 and body["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server["url"], api_key="wrong", max_retries=0).models.list()
    assert post(server["url"], json.dumps(GOOD).encode())[0] == 200


def test_one_generation_at_a_time_four_clients_all_answered(server, client, monkeypatch):
    engine, active, seen = server["engine"], [0], []
    original = engine.generate

    def counting(*a, **k):
        active[0] += 1
        seen.append(active[0])
        try:
            return original(*a, **k)
        finally:
            active[0] -= 1

    monkeypatch.setattr(engine, "generate", counting)
    replies = [None] * 4

    def ask(n):
        replies[n] = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, seed=n)

    threads = [threading.Thread(target=ask, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(r is not None and r.usage.completion_tokens == 12 for r in replies)
    assert seen == [1, 1, 1, 1]  # never two at once


def test_a_long_conversation_is_cut_and_says_how_much(client):
    turns = [{"role": r, "content": "word " * 30} for _ in range(8) for r in ("user", "assistant")][:-1]
    reply = client.chat.completions.create(model="tiny", messages=turns, max_tokens=8, seed=0)
    stats = reply.model_extra["glassbox"]
    assert stats["dropped_messages"] > 0 and stats["prompt_tokens"] <= 256 - 8
    assert stats["time_to_first_token_s"] > 0


# ---------------------------------------------------------------------------- the stage


def test_serve_settings_defaults_and_the_command_line():
    from core.lab import cli

    s = serve_stage.Settings(run="my-run")
    assert s.host == "127.0.0.1"
    assert cli.to_argv(serve_stage.Settings(run="r", port=9000, api_key_env="K")) == [
        "--run", "r", "--port", "9000", "--api-key-env", "K"]
    with pytest.raises(serve_stage.ServeError):
        serve_stage.api_key(serve_stage.Settings(run="r", api_key_env="GLASSBOX_SURELY_UNSET_VAR"))
    with pytest.raises(serve_stage.ServeError):
        serve_stage.Settings(run="r", port=70000)
    with pytest.raises(serve_stage.ServeError):
        serve_stage.app_for(serve_stage.Settings(run="no-such-run"))


def test_serving_a_saved_run_from_the_command_line(isolated_workspace, tokenizer):
    runs.create_run("served", "instruct", {"base": "test"})
    models.save_model_run("served", tiny_model(tokenizer), tokenizer)
    runs.write_status("served", "finished")
    port = free_port()
    env = {**os.environ, "SERVE_TEST_KEY": KEY}
    code = ("from core.stages import serve; "
            f"serve.run(serve.Settings(run='served', port={port}, api_key_env='SERVE_TEST_KEY'))")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=30)
        deadline = time.monotonic() + 90
        while True:
            try:
                assert [m.id for m in client.models.list().data] == ["served"]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() else ""
                time.sleep(0.3)
        reply = client.chat.completions.create(model="served", messages=HELLO, max_tokens=5, seed=0)
        assert reply.usage.completion_tokens == 5
    finally:
        proc.terminate()
        proc.wait(20)


def test_properties_come_in_the_schemas_order(client):
    reply = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=60, seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
    assert list(json.loads(reply.choices[0].message.content)) == ["score", "reason"]


def test_refusals_come_before_a_stream_starts_and_unknown_paths_are_json(server):
    too_long = {**GOOD, "stream": True, "messages": [{"role": "user", "content": "word " * 2000}]}
    code, body = post(server["url"], json.dumps(too_long).encode())
    assert code == 400 and body["error"]["code"] == "context_length_exceeded"
    bad_schema = {**GOOD, "stream": True, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}}
    code, body = post(server["url"], json.dumps(bad_schema).encode())
    assert code == 400 and body["error"]["param"] == "response_format"
    request = urllib.request.Request(server["url"] + "/no-such-thing", headers={"Authorization": f"Bearer {KEY}"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 404 and "error" in json.loads(info.value.read())
    assert post(server["url"], json.dumps(GOOD).encode())[0] == 200


def test_integer_bounds_are_kept_by_the_constrained_decoder(client):
    schema = {"type": "object", "additionalProperties": False, "required": ["score"],
              "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 5}}}
    assert serve.bounded(schema)["properties"]["score"]["enum"] == [1, 2, 3, 4, 5]
    for seed in range(3):
        reply = client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=30, seed=seed, temperature=1.5,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        jsonschema.validate(json.loads(reply.choices[0].message.content), schema)
