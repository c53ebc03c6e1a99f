"""Bad input at every door: a typed GlassBoxError in core, a clear message on the page, no traceback.

Part 1 is one table of (entry point, bad value) for the core functions behind every page: empty,
huge, wrong type, NaN, negative, non-UTF-8, binary, wrong JSON shape, missing columns — as each
applies. Part 2 puts bad values into the pages themselves (AppTest: `at.error` says what is wrong,
`at.exception` is empty). Part 3 is security: user, corpus and model text drawn as HTML is
escaped; an API key is never written anywhere; the server's upload limit and address.

Cases owned by another module that still fail are marked `xfail(strict=True)` with the reason, so
the fix turns them into passing tests.
"""

from __future__ import annotations

import json
import math
import os
import time
import tomllib
from pathlib import Path

import pytest
import torch
from streamlit.testing.v1 import AppTest

from core.lab import data, jobs, runs
from core.gpt import attention as att
from core.lab import gpt2 as G
from core.lab import judge_client as J
from core.gpt import model as M
from core.gpt import tokenizers as tok
from core.lab import tokenizer_files
from core.gpt import train as T
from core.__main__ import main as cli_main
from core.gpt.errors import GlassBoxError, ModelConfigError, TokenizerError, TrainingError
from core.lab.errors import DataError, JudgeError, RunError
from core.gpt import classify as C
from core.gpt import instruct as I
from core.stages import instruct as instruct_stage
from core.stages import classify as S5
from core.gpt.pretrain import LanguageModelTask

REPO = Path(__file__).resolve().parent.parent
NAN, INF = float("nan"), float("inf")
XSS = ["<script>alert(1)</script>", "<img src=x onerror=alert(1)>"]


def xfail(reason: str):
    return pytest.mark.xfail(strict=True, reason=reason)


def page(name: str) -> AppTest:
    at = AppTest.from_file(str(REPO / "pages" / name), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


# ============================================================================ part 1: core


def endpoint(**bad):
    values = dict(base_url="http://127.0.0.1:9/v1", model="m", api_key="k", timeout=5.0, max_concurrency=1)
    return J.EndpointSettings(**{**values, **bad})


def gpt_config(**bad):
    values = dict(vocab_size=50, context_length=16, n_embd=32, n_head=4, n_layer=2)
    return M.GPTConfig(**{**values, **bad})


def train_config(**bad):
    return T.check_config(T.TrainConfig(**{"max_steps": 10, **bad}))


def sms_file(tmp_path: Path, content: bytes) -> str:
    path = tmp_path / "sms.txt"
    path.write_bytes(content)
    return f"file:{path}"


def hf_folder(tmp_path: Path, files: dict[str, bytes]) -> Path:
    folder = tmp_path / "gpt2"
    folder.mkdir(exist_ok=True)
    for name, content in files.items():
        (folder / name).write_bytes(content)
    return folder


SMALL_HF_CONFIG = b'{"n_embd": 8, "n_head": 2, "n_layer": 1, "n_positions": 8, "vocab_size": 10}'

# (entry point · bad value, call(tmp_path), expected error type, words the message must contain)
CORE_CASES = [
    # stage 1: uploads and the BPE vocabulary size
    ("upload · empty", lambda t: data.save_upload("a.txt", b""), DataError, "empty"),
    ("upload · huge", lambda t: data.save_upload("a.txt", b"a" * (data.MAX_UPLOAD_BYTES + 1)), DataError, "limit"),
    ("upload · binary", lambda t: data.save_upload("a.png", b"\x89PNG\x00\x00" * 50), DataError, "binary"),
    ("upload · non-UTF-8", lambda t: data.save_upload("a.txt", "café".encode("latin-1")), DataError, "UTF-8"),
    ("upload · UTF-16", lambda t: data.save_upload("a.txt", "hello".encode("utf-16")), DataError, "binary"),
    ("upload · wrong type (str)", lambda t: data.save_upload("a.txt", "text"), DataError, "bytes"),
    ("upload · wrong type (None)", lambda t: data.save_upload("a.txt", None), DataError, "bytes"),
    ("upload · no name", lambda t: data.save_upload(None, b"hi"), DataError, "name"),
    ("upload · name only dots", lambda t: data.save_upload("...", b"hi"), DataError, "name"),
    ("vocab size · 0", lambda t: tok.train_bpe("hello world " * 20, 0), TokenizerError, "257"),
    ("vocab size · negative", lambda t: tok.train_bpe("hello world " * 20, -5), TokenizerError, "257"),
    ("vocab size · NaN", lambda t: tok.train_bpe("hello world " * 20, NAN), TokenizerError, "whole number"),
    ("vocab size · infinite", lambda t: tok.train_bpe("hello world " * 20, INF), TokenizerError, "whole number"),
    ("vocab size · huge", lambda t: tok.train_bpe("hello world " * 20, 10**9), TokenizerError, "200"),
    ("vocab size · text", lambda t: tok.train_bpe("hello world " * 20, "1000"), TokenizerError, "whole number"),
    ("corpus · empty", lambda t: tok.train_bpe("", 300), TokenizerError, "empty"),
    ("corpus · bytes", lambda t: tok.train_char(b"bytes"), TokenizerError, "text"),
    ("corpus · lone surrogate", lambda t: tok.train_bpe("a\ud800b", 300), TokenizerError, "surrogate"),
    ("tokenizer spec · unknown", lambda t: tokenizer_files.tokenizer_from_spec("no-such-run", "abc"), GlassBoxError, "no-such-run"),
    # stage 2: the worked example's sentence and sizes
    ("attention text · empty", lambda t: att.attention_steps(""), GlassBoxError, "word"),
    ("attention text · huge", lambda t: att.attention_steps("w " * 10_000), GlassBoxError, "24"),
    pytest.param("attention text · None", lambda t: att.attention_steps(None), GlassBoxError, "text",
                 marks=()),
    pytest.param("attention text · number", lambda t: att.attention_steps(5), GlassBoxError, "text",
                 marks=()),
    ("attention · dropout 1", lambda t: att.attention_steps("a b", dropout_p=1.0), GlassBoxError, "ropout"),
    ("attention · dropout NaN", lambda t: att.attention_steps("a b", dropout_p=NAN), GlassBoxError, "ropout"),
    ("attention · d_model 0", lambda t: att.attention_steps("a b", d_model=0), GlassBoxError, ""),
    pytest.param("attention · seed NaN", lambda t: att.attention_steps("a b", seed=NAN), GlassBoxError, "seed",
                 marks=()),
    pytest.param("attention · d_model as text", lambda t: att.attention_steps("a b", d_model="4"), GlassBoxError,
                 "", marks=()),
    # stage 3: the model's shape (sliders) and the GPT-2 import folder
    ("model · n_embd negative", lambda t: gpt_config(n_embd=-1), ModelConfigError, "n_embd"),
    ("model · n_embd NaN", lambda t: gpt_config(n_embd=NAN), ModelConfigError, "n_embd"),
    ("model · n_embd as text", lambda t: gpt_config(n_embd="64"), ModelConfigError, "n_embd"),
    ("model · heads do not divide", lambda t: gpt_config(n_embd=30, n_head=4), ModelConfigError, "divid"),
    ("model · dropout 1.5", lambda t: gpt_config(dropout=1.5), ModelConfigError, "dropout"),
    ("model · context NaN", lambda t: gpt_config(context_length=NAN), ModelConfigError, "context"),
    ("model · unknown preset", lambda t: M.preset_config("huge", 50), ModelConfigError, "preset"),
    ("model · config not a dict", lambda t: M.GPTConfig.from_dict([1, 2]), ModelConfigError, ""),
    ("import · no folder", lambda t: G.load_hf_gpt2(t / "nowhere"), GlassBoxError, "nowhere"),
    ("import · empty folder", lambda t: G.load_hf_gpt2(hf_folder(t, {})), GlassBoxError, "config.json"),
    ("import · config not JSON", lambda t: G.load_hf_gpt2(hf_folder(t, {"config.json": b"{bad", "model.safetensors": b"x"})),
     GlassBoxError, "config.json"),
    pytest.param("import · config wrong shape", lambda t: G.load_hf_gpt2(hf_folder(t, {"config.json": b"[1, 2]", "model.safetensors": b"x"})),
     GlassBoxError, "config.json", marks=()),
    ("import · config missing keys", lambda t: G.load_hf_gpt2(hf_folder(t, {"config.json": b'{"n_embd": "x"}'})),
     GlassBoxError, ""),
    ("import · weights garbage", lambda t: G.load_hf_gpt2(hf_folder(
        t, {"config.json": SMALL_HF_CONFIG, "model.safetensors": b"\x00" * 100})), GlassBoxError, "model.safetensors"),
    ("import · only a pickle", lambda t: G.load_hf_gpt2(hf_folder(
        t, {"config.json": SMALL_HF_CONFIG, "pytorch_model.bin": b"\x80\x04pickle"})), GlassBoxError, "safetensors"),
    ("import · run id escapes", lambda t: G.import_gpt2(t, "../x"), RunError, "run id"),
    # stage 4: learning rate, steps, corpus shorter than a batch
    ("lr · NaN", lambda t: train_config(lr=NAN), TrainingError, "lr"),
    ("lr · negative", lambda t: train_config(lr=-1), TrainingError, "learning rate"),
    ("lr · text", lambda t: train_config(lr="1e-3"), TrainingError, "lr"),
    ("steps · 0", lambda t: train_config(max_steps=0), TrainingError, "above 0"),
    ("steps · negative", lambda t: train_config(max_steps=-1), TrainingError, "above 0"),
    ("steps · NaN", lambda t: train_config(max_steps=NAN), TrainingError, "steps"),
    ("minutes · infinite", lambda t: train_config(max_minutes=INF), TrainingError, "minutes"),
    ("no budget", lambda t: train_config(max_steps=None), TrainingError, "budget"),
    ("batch size · 0", lambda t: train_config(batch_size=0), TrainingError, "Batch size"),
    ("batch size · 2.5", lambda t: train_config(batch_size=2.5), TrainingError, "Batch size"),
    pytest.param("warm-up · NaN", lambda t: train_config(warmup_steps=NAN), TrainingError, "arm-up",
                 marks=()),
    pytest.param("seed · NaN", lambda t: train_config(seed=NAN), TrainingError, "seed",
                 marks=()),
    ("corpus · shorter than a window", lambda t: LanguageModelTask(torch.arange(10), 32), TrainingError, "window"),
    ("val fraction · NaN", lambda t: LanguageModelTask(torch.arange(1000), 8, NAN), GlassBoxError, ""),
    ("val fraction · 1.5", lambda t: LanguageModelTask(torch.arange(1000), 8, 1.5), GlassBoxError, ""),
    # stage 5: the SMS file and a typed message
    ("SMS · empty", lambda t: C.parse_sms_lines(""), GlassBoxError, ""),
    ("SMS · no tab column", lambda t: C.parse_sms_lines("hello world\nfoo bar\n"), GlassBoxError, "line 1"),
    ("SMS · unknown label", lambda t: C.parse_sms_lines("maybe\thello\n"), GlassBoxError, "maybe"),
    ("SMS · CSV instead of TSV", lambda t: C.parse_sms_lines("label,text\nham,hi\n"), GlassBoxError, "line 1"),
    ("SMS file · non-UTF-8", lambda t: S5.load_sms_examples(sms_file(t, b"ham\tcaf\xe9\n")), DataError, "UTF-8"),
    ("SMS file · binary", lambda t: S5.load_sms_examples(sms_file(t, b"\x00\x01\x02" * 20)), DataError, "binary"),
    ("SMS file · missing", lambda t: S5.load_sms_examples(f"file:{t / 'nope.txt'}"), DataError, "nope.txt"),
    ("message · empty", lambda t: S5.classify_message("any", ""), DataError, "Type a message"),
    ("message · blank", lambda t: S5.classify_message("any", " \n\t"), DataError, "Type a message"),
    ("message · None", lambda t: S5.classify_message("any", None), DataError, "Type a message"),
    # stage 6: the instruction data (JSON) and a typed instruction
    ("instructions · empty", lambda t: I.parse_instruction_records(""), DataError, ""),
    ("instructions · not JSON", lambda t: I.parse_instruction_records("{oops"), DataError, "JSON"),
    ("instructions · an object", lambda t: I.parse_instruction_records('{"a": 1}'), DataError, "list"),
    ("instructions · list of strings", lambda t: I.parse_instruction_records('["a", "b"]'), DataError, ""),
    ("instructions · missing output", lambda t: I.parse_instruction_records('[{"instruction": "x", "input": ""}]'),
     DataError, "output"),
    ("instructions · number field", lambda t: I.parse_instruction_records(
        '[{"instruction": 5, "input": "", "output": "y"}]'), DataError, "instruction"),
    ("instructions · NaN field", lambda t: I.parse_instruction_records(
        '[{"instruction": "x", "input": "", "output": NaN}]'), DataError, "output"),
    # stage 7: the endpoint's URL and timeout
    ("URL · empty", lambda t: endpoint(base_url=""), JudgeError, "URL"),
    ("URL · ftp", lambda t: endpoint(base_url="ftp://x"), JudgeError, "http"),
    ("URL · javascript:", lambda t: endpoint(base_url="javascript:alert(1)"), JudgeError, "http"),
    ("URL · not a URL", lambda t: endpoint(base_url="not a url"), JudgeError, "URL"),
    ("URL · with a password", lambda t: endpoint(base_url="http://user:pw@host/v1"), JudgeError, "password"),
    ("URL · None", lambda t: endpoint(base_url=None), JudgeError, "URL"),
    ("timeout · 0", lambda t: endpoint(timeout=0), JudgeError, "imeout"),
    ("timeout · negative", lambda t: endpoint(timeout=-1), JudgeError, "imeout"),
    ("timeout · NaN", lambda t: endpoint(timeout=NAN), JudgeError, "imeout"),
    ("timeout · infinite", lambda t: endpoint(timeout=INF), JudgeError, "imeout"),
    ("timeout · text", lambda t: endpoint(timeout="5"), JudgeError, "imeout"),
    ("model name · empty", lambda t: endpoint(model=""), JudgeError, "model"),
    ("concurrency · 0", lambda t: endpoint(max_concurrency=0), JudgeError, ""),
]


@pytest.mark.parametrize("label, call, error, words", CORE_CASES,
                         ids=[c.values[0] if hasattr(c, "values") else c[0] for c in CORE_CASES])
def test_core_refuses_bad_input_with_a_typed_clear_error(tmp_path, label, call, error, words):
    with pytest.raises(error) as raised:
        call(tmp_path)
    message = str(raised.value)
    assert message and "Traceback" not in message
    assert words.lower() in message.lower(), message


@pytest.mark.parametrize("option, value, words", [
    ("--lr", "nan", "lr"), ("--lr", "-1", "learning rate"), ("--steps", "-5", "above 0"),
    ("--steps", "0", "above 0"), ("--minutes", "inf", "minutes"), ("--batch-size", "0", "Batch size"),
    ("--val-fraction", "nan", ""), ("--context-length", "-3", "context"), ("--preset", "gigantic", "preset"),
    ("--steps", "ten", "invalid int"), ("--data", "file:/no/such/file.txt", "No file"),
])
def test_pretrain_command_refuses_bad_settings_in_one_line(option, value, words, capsys):
    argv = ["pretrain", "--data", "the-verdict", "--tokenizer", "char", "--preset", "tiny", "--steps", "1",
            "--run-id", "bad", option, value]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]  # progress lines may come first; the error is one line
    assert last.startswith("error:") and words.lower() in last.lower(), err


def test_corpus_shorter_than_a_batch_is_refused_before_anything_is_written(tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("Too short to train on.")
    argv = ["pretrain", "--data", f"file:{short}", "--tokenizer", "char", "--preset", "tiny", "--steps", "1",
            "--run-id", "short"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "fewer than one window" in err and "Traceback" not in err
    assert not (runs.run_dir("short") / "model.safetensors").exists()


# ============================================================================ part 2: pages
# One AppTest session per page walks through its table of bad values (a fresh page per value
# would cost seconds each); every value must leave an error message and no exception.


def errors(at: AppTest) -> str:
    return "\n".join(e.value for e in at.error)


def test_page_2_sentence():
    at = page("2_Attention.py")
    for text, words in [("", "word"), ("w " * 5000, "24"), ("\x00\x01\x02", None), ("ok then", None)]:
        at.text_input(key="toy_text").set_value(text).run()
        assert not at.exception, (text[:20], at.exception)
        if words:
            assert words in errors(at), text[:20]
    assert not at.error  # a good sentence after bad ones: the page recovers


def test_page_3_import_folder(tmp_path, monkeypatch):
    hf_folder(tmp_path, {"config.json": SMALL_HF_CONFIG, "pytorch_model.bin": b"\x80\x04pickle"})
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("GLASSBOX_IMPORT_DIRS", str(tmp_path))  # the folders this server lets the app read
    at = page("3_Architecture.py")
    for folder, words in [("", "Type the folder"), ("/no/such/folder", "folders this server allows"),
                          (str(tmp_path / "no-such-folder"), "no-such-folder is not a folder"),
                          (str(tmp_path / "empty"), "config.json"), (str(tmp_path / "gpt2"), "never unpickled")]:
        at.text_input(key="import_folder").set_value(folder).run()
        at.button(key="import_go").click().run()
        assert not at.exception, (folder, at.exception)
        assert words in errors(at), (folder, errors(at))


def test_page_3_shape_sliders():
    at = page("3_Architecture.py")
    n_embd = at.select_slider(key="cfg_n_embd").value
    at.slider(key="cfg_n_head").set_value(next(h for h in range(2, 33) if n_embd % h)).run()
    assert not at.exception, at.exception
    assert "divid" in errors(at)  # heads that do not divide the width: said, not crashed
    for vocab in (1, 300_000):  # the number box's extremes still give a shape to look at
        at.slider(key="cfg_n_head").set_value(1)
        at.number_input(key="cfg_vocab_size").set_value(vocab).run()
        assert not at.exception and not at.error, (vocab, at.exception, errors(at))


@pytest.mark.parametrize("page_file, filename, content", [
    ("5_Classification.py", "SMSSpamCollection", b"label,text\nham,missing the tab column\n"),
    ("6_Instructions.py", "instruction-data.json", b'{"not": "the right shape"}'),
], ids=["5-SMS missing columns", "6-instructions wrong JSON shape"])
def test_pages_5_and_6_with_a_malformed_data_file(tmp_path, monkeypatch, page_file, filename, content):
    """A damaged copy of the page's data set in the data folder: a message, not a crash. (The
    registry's sha256 check catches any damaged copy; parsing bad content is the core table's job.)"""
    (tmp_path / filename).write_bytes(content)
    monkeypatch.setenv("GLASSBOX_DATA_DIR", str(tmp_path))
    at = page(page_file)
    assert filename in errors(at) or "sha256" in errors(at), errors(at)


def test_page_4_run_name():
    if not (REPO / "pages" / "4_Pretraining.py").exists():
        pytest.skip("pages/4_Pretraining.py is not written yet")
    at = page("4_Pretraining.py")
    for name in ["", "../escape", "/etc/passwd", "a" * 80, "<script>x</script>"]:
        at.text_input(key="pt_run_name").set_value(name).run()
        at.button(key="pt_start").click().run()
        assert not at.exception, (name, at.exception)
        assert "not a valid run id" in errors(at), name
    assert not jobs.active_jobs() and not runs.list_runs()


def test_page_5_own_message():
    from tests.test_page_5 import make_finished_classifier, make_start_run

    make_finished_classifier("spam-run", make_start_run())
    at = page("5_Classification.py")
    for message, shown in [("", "error"), (" \n ", "error"), ("WIN " * 3000, "info"),
                           ("\x00\x01\ufffd binary-ish", None)]:
        at.text_area[0].set_value(message)
        next(b for b in at.button if b.label == "Classify").click().run()  # from the current tree
        assert not at.exception, (message[:20], at.exception)
        if shown == "error":
            assert "Type a message" in errors(at)
        elif shown == "info":  # too long is not an error: the page says what was cut
            assert any("only the first" in i.value for i in at.info)
        else:
            assert not at.error and any("The model says" in m.value for m in at.markdown), (errors(at), [m.value for m in at.markdown][-5:])


def test_page_7_endpoint_url():
    at = page("7_Judge.py")
    for url, words in [("", "URL"), ("ftp://example.org", "http"), ("not a url", "URL"),
                       ("http://user:secret@host/v1", "password"), ("http://127.0.0.1:1/v1", "")]:
        at.text_input(key="judge_base_url").set_value(url).run()
        at.button(key="judge_test").click().run()
        assert not at.exception, (url, at.exception)
        assert errors(at) and words in errors(at), (url, errors(at))
        assert "secret" not in errors(at)


# ============================================================================ part 3: security


def html_blocks(at: AppTest) -> list[str]:
    """Everything the page hands the browser as HTML: markdown with HTML allowed, plotly specs."""
    blocks = [m.proto.body for m in at.markdown if m.proto.allow_html]
    blocks += [c.proto.spec for c in at.get("plotly_chart")]
    return blocks


def assert_escaped(at: AppTest, payloads: list[str]) -> None:
    blocks = html_blocks(at)
    assert blocks, "the page drew no HTML: nothing was checked"
    for payload in payloads:
        raw = payload.split(">")[0]  # "<script" or "<img src=x onerror=alert(1)"
        assert not [b for b in blocks if raw in b], f"{raw!r} reached the page unescaped"


def test_page_1_typed_text_and_uploaded_corpus_are_escaped():
    at = page("1_Tokenisation.py")
    at.text_area[0].set_value(f"hello {XSS[0]} world {XSS[1]}").run()
    assert not at.exception, at.exception
    assert_escaped(at, XSS)
    assert any("&lt;" in b for b in html_blocks(at))  # the text is there, as text
    at.file_uploader[0].set_value(("evil.txt", (" and ".join(XSS) + " more words. ").encode() * 40,
                                   "text/plain")).run()
    assert not at.exception, at.exception
    at.text_area[0].set_value(" ".join(XSS)).run()
    assert_escaped(at, XSS)


def test_page_2_sentence_and_heatmap_labels_are_escaped():
    at = page("2_Attention.py")
    words = [x.replace(" ", "_") for x in XSS]  # the worked example splits on spaces
    at.text_input(key="toy_text").set_value(f"one {words[0]} two {words[1]}").run()
    assert not at.exception, at.exception
    assert_escaped(at, words)


def test_page_6_model_and_data_text_is_escaped():
    """An instruction run whose data and answers carry markup (as a model or data set could)."""
    records = [{"instruction": f"Say {x}", "input": x, "output": x, "base_response": x,
                "tuned_response": f"ok {x}", "base_follows_format": False, "tuned_follows_format": True,
                "base_problems": [x], "tuned_problems": []} for x in XSS]
    run = runs.create_run("evil", "instruct", {})
    runs.write_json_atomic(run.path / instruct_stage.RESPONSES_FILE, records)
    runs.write_json_atomic(run.path / instruct_stage.FORMAT_RATES_FILE,
                           {"start": 0.0, "tuned": 1.0, "n": 2, "max_new_tokens": 8})
    runs.write_status("evil", "finished")
    at = page("6_Instructions.py")
    assert_escaped(at, XSS)
    assert sum("&lt;" in b for b in html_blocks(at)) >= 1


SECRET = "sk-glassbox-NEVER-WRITTEN-9f8e7d6c5b4a"


def test_an_api_key_is_never_written_to_any_file_or_shown_in_an_error(isolated_workspace):
    """A judge job that succeeds and one whose key is refused: grep every file either wrote."""
    from tests.fake_openai_server import FakeOpenAIServer

    with FakeOpenAIServer(api_key=SECRET) as server:
        argv = ["judge", "--data", "eval-example-data", "--base-url", server.url, "--model", "judge-model",
                "--limit", "2", "--timeout", "5", "--max-attempts", "1"]
        # The refused one first: the good one fills the judge cache, which would answer it.
        for run_id, key in (("refused", SECRET + "-wrong"), ("judged", SECRET)):
            jobs.start_job([*argv, "--run-id", run_id], run_id, env={"OPENAI_API_KEY": key})
            deadline = time.time() + 90
            while jobs.job_state(run_id).active and time.time() < deadline:
                time.sleep(0.2)
    assert jobs.job_state("judged").state == "finished", jobs.job_state("judged").log_tail
    refused = jobs.job_state("refused")
    assert refused.state == "failed" and "key" in refused.error
    assert (runs.run_dir("judged") / "job.log").is_file()

    written = [p for root in (isolated_workspace["checkpoints"], isolated_workspace["downloads"])
               for p in root.rglob("*") if p.is_file()]
    assert len(written) >= 6
    for fragment in (SECRET, SECRET[-12:], SECRET + "-wrong"):
        leaked = [str(p) for p in written if fragment.encode() in p.read_bytes()]
        assert not leaked, f"the key appears in {leaked}"
    for text in (refused.error, refused.message, refused.log_tail):
        assert SECRET[-12:] not in (text or "")


def test_upload_limit_and_address_in_the_server_config():
    config = tomllib.loads((REPO / ".streamlit" / "config.toml").read_text())
    assert config["server"]["maxUploadSize"] * 2**20 == data.MAX_UPLOAD_BYTES  # Streamlit counts MB
    assert config["server"]["address"] == "127.0.0.1"  # this machine only, unless told otherwise
    assert config["browser"]["gatherUsageStats"] is False


def test_no_page_turns_off_escaping_without_escaping_itself():
    """Every `unsafe_allow_html` / st.html / st.iframe in the pages is listed here and tested:
    pages 1, 6 and 8 above; microscope.py's chips (html.escape on every token); the teacher's
    report card (escaped, test_classroom) and fixed CSS; learner.py's cookie (a checked name)."""
    import re

    found = {}
    for path in sorted((REPO / "pages").glob("**/*.py")):
        for line in path.read_text().splitlines():
            if re.search(r"unsafe_allow_html\s*=\s*True|st\.html\(|components\.html\(|st\.iframe\(", line):
                found.setdefault(path.name, 0)
                found[path.name] += 1
    assert set(found) <= {"1_Tokenisation.py", "6_Instructions.py", "8_Chat.py", "microscope.py", "9_Teacher.py",
                          "learner.py"}, found
