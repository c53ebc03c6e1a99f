"""Stage 1 page: renders on the built-in corpus, shows escaped token spans, refuses bad uploads,
and saves a tokeniser run."""

import json

import pytest
from streamlit.testing.v1 import AppTest

from core.lab import tokenizer_files as tok

PAGE = "../pages/1_Tokenisation.py"


def span_blocks(at) -> list[str]:
    return [m.value for m in at.markdown if "<span" in m.value]


@pytest.fixture
def page():
    at = AppTest.from_file(PAGE, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


def test_renders_with_the_built_in_corpus(page):
    at = page
    assert not at.error
    assert at.selectbox[0].value == "python-docs"
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["Characters"].replace(",", "")) > 100_000
    # four tokenisers side by side, each as coloured spans
    blocks = span_blocks(at)
    assert len(blocks) == 4
    summary = at.dataframe[1].value
    assert list(summary["tokeniser"]) == ["Characters", "Words", "Our BPE", "GPT-2 (tiktoken)"]
    rows = summary.set_index("tokeniser")
    assert rows.loc["GPT-2 (tiktoken)", "round trip"] == "✓" and rows.loc["Our BPE", "round trip"] == "✓"
    assert rows.loc["Our BPE", "vocabulary"] == 1000
    assert rows.loc["Characters", "chars per token"] <= 1.0 < rows.loc["GPT-2 (tiktoken)", "chars per token"]
    merges = at.dataframe[0].value
    assert list(merges["rank"][:3]) == [1, 2, 3]
    assert any("✓" in s.value for s in at.success)  # the round trip of our BPE


def test_typed_text_is_escaped_and_counted(page):
    at = page
    typed = "Hello, world <script>alert(1)</script><img src=x onerror=alert(2)>"
    at.text_area[0].set_value(typed).run()
    assert not at.exception
    blocks = span_blocks(at)
    assert all("<script" not in block and "<img" not in block and "&lt;" in block for block in blocks)
    rows = at.dataframe[1].value.set_index("tokeniser")
    assert rows.loc["GPT-2 (tiktoken)", "tokens"] == len(tok.gpt2_tokenizer().encode(typed))
    assert rows.loc["Characters", "tokens"] == len(typed)
    assert "15496, 11, 995" in " ".join(c.value for c in at.caption)


def test_bad_uploads_show_an_error(page, isolated_workspace, monkeypatch):
    at = page
    at.file_uploader[0].set_value(("photo.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00binary", "text/plain")).run()
    assert not at.exception
    assert any("binary" in e.value for e in at.error)
    at.file_uploader[0].set_value(("latin1.txt", "café".encode("latin-1"), "text/plain")).run()
    assert any("UTF-8" in e.value for e in at.error)
    at.file_uploader[0].set_value(("empty.txt", b"", "text/plain")).run()
    assert any("empty" in e.value for e in at.error)
    from core.lab import data

    monkeypatch.setattr(data, "MAX_UPLOAD_BYTES", 100)
    at.file_uploader[0].set_value(("big.txt", b"word " * 100, "text/plain")).run()
    assert any("limit" in e.value for e in at.error)
    assert not (isolated_workspace["downloads"] / "uploads").exists() or not any(
        (isolated_workspace["downloads"] / "uploads").iterdir())
    # the page still works on the corpus it had
    assert len(span_blocks(at)) == 4


def test_tiny_upload_shorter_than_the_context(page):
    at = page
    at.file_uploader[0].set_value(("tiny.txt", b"to be", "text/plain")).run()
    assert not at.exception
    assert any("upload:tiny.txt" in s.value for s in at.success)
    at.radio[1].set_value("the corpus").run()
    assert any("too short for a context" in e.value for e in at.error)


def test_save_the_tokeniser_as_a_run(page, isolated_workspace):
    at = page
    at.text_input[0].set_value("my-bpe").run()
    at.button[0].click().run()
    assert not at.exception and not at.error
    folder = isolated_workspace["checkpoints"] / "my-bpe"
    assert (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["stage"] == "tokenizer" and config["tokenizer"] == "bpe" and config["data"] == "python-docs"
    before = (folder / "tokenizer.json").read_bytes()
    at.radio[2].set_value("char").run()
    at.button[0].click().run()  # the same id again: refused, the saved run is untouched
    assert any("already exists" in e.value for e in at.error)
    assert (folder / "tokenizer.json").read_bytes() == before


def test_long_text_is_cut_with_a_clear_message(page):
    at = page
    at.text_area[0].set_value("ab " * 4000).run()  # 12,000 characters
    assert not at.exception
    assert any("only the first 5,000 characters" in w.value for w in at.warning)
    rows = at.dataframe[1].value.set_index("tokeniser")
    assert rows.loc["Characters", "tokens"] == 5000


def test_the_code_behind_the_merges_is_the_live_naive_bpe(page):
    import inspect

    from core.gpt import tokenizers

    shown = [c.value.strip() for c in page.code]
    assert inspect.getsource(tokenizers.train_bpe_naive).strip() in shown
    assert inspect.getsource(tokenizers.train_bpe).strip() in shown
    assert any("core.gpt.tokenizers.train_bpe_naive" in c.value for c in page.caption)


def test_saving_writes_a_finished_run_without_a_pid(page, isolated_workspace):
    at = page
    at.text_input[0].set_value("saved-here").run()
    at.button[0].click().run()
    status = json.loads((isolated_workspace["checkpoints"] / "saved-here" / "status.json").read_text())
    assert status["state"] == "finished" and "pid" not in status
