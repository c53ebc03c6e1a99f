"""The data-source registry: offline built-in corpus, checksums, uploads, fast failure offline."""

import hashlib
import time

import pytest

from core.lab import data
from core.lab.errors import DataError


def test_builtin_corpus_loads_offline(monkeypatch):
    monkeypatch.setenv("GLASSBOX_DATA_DIR", "/nonexistent")
    text = data.read_text("python-docs")
    assert len(text) > 100_000
    assert "for" in text and "while" in text
    assert data.read_text("python-docs") == text  # same corpus every time


def test_shared_files_are_found_by_name_and_checked(shared_data):
    path = data.locate("tinyshakespeare")
    assert path.name == "tinyshakespeare.txt"
    assert data.read_text("tinyshakespeare").startswith("First Citizen:")
    rows = {r["name"]: r for r in data.list_sources()}
    assert rows["sms-spam"]["available"] and rows["sms-spam"]["bytes"] == 477907


def test_wrong_sha256_is_refused(tmp_path, monkeypatch):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "the-verdict.txt").write_bytes(b"x" * 20479)  # right size, wrong bytes
    monkeypatch.setenv("GLASSBOX_DATA_DIR", str(folder))
    with pytest.raises(DataError, match="sha256"):
        data.locate("the-verdict")


def test_missing_file_says_how_to_supply_it(monkeypatch):
    monkeypatch.setenv("GLASSBOX_DATA_DIR", "/nonexistent")
    with pytest.raises(DataError, match="GLASSBOX_DATA_DIR"):
        data.locate("tinyshakespeare")


def test_download_from_dead_url_fails_fast(monkeypatch):
    monkeypatch.setenv("GLASSBOX_DATA_DIR", "/nonexistent")
    start = time.monotonic()
    with pytest.raises(DataError, match="Could not download"):
        data.fetch("the-verdict", url="http://127.0.0.1:9/the-verdict.txt", timeout=3)
    assert time.monotonic() - start < 5


def test_download_checks_sha256_and_writes_atomically(tmp_path, monkeypatch, isolated_workspace):
    import http.server
    import threading

    monkeypatch.setenv("GLASSBOX_DATA_DIR", "/nonexistent")
    served = tmp_path / "srv"
    served.mkdir()
    (served / "good.txt").write_bytes((isolated_workspace["shared"] / "the-verdict.txt").read_bytes())
    (served / "bad.txt").write_bytes(b"not the verdict")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(served), **k)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        with pytest.raises(DataError, match="refusing"):
            data.fetch("the-verdict", url=f"{base}/bad.txt")
        assert not (isolated_workspace["downloads"] / "the-verdict.txt").exists()
        seen = []
        path = data.fetch("the-verdict", url=f"{base}/good.txt", progress=lambda d, t: seen.append(d))
    finally:
        server.shutdown()
    assert path == isolated_workspace["downloads"] / "the-verdict.txt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.SOURCES["the-verdict"].sha256
    assert seen and seen[-1] == 20479
    assert data.locate("the-verdict") == path


@pytest.mark.parametrize("name, payload, message", [
    ("empty.txt", b"", "empty"),
    ("bin.dat", b"\x00\x01\x02binary", "binary"),
    ("latin1.txt", "café".encode("latin-1"), "not UTF-8"),
    ("huge.txt", b"a" * (data.MAX_UPLOAD_BYTES + 1), "limit"),
    ("..", b"hello", "not a usable file name"),
])
def test_bad_uploads_are_refused(name, payload, message):
    with pytest.raises(DataError, match=message):
        data.save_upload(name, payload)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "..\\..\\x.txt", "a/../../b.txt"])
def test_upload_names_cannot_escape_data_dir(name, isolated_workspace):
    source = data.save_upload(name, b"some text\n")
    uploads = isolated_workspace["downloads"] / "uploads"
    stored = list(uploads.iterdir())
    assert len(stored) == 1 and stored[0].parent == uploads
    assert data.read_text(source) == "some text\n"


def test_upload_round_trip_and_listing():
    source = data.save_upload("My Notes.txt", "Grüße 👋\n".encode())
    assert source == "upload:My_Notes.txt"
    assert data.read_text(source) == "Grüße 👋\n"
    assert source in {r["name"] for r in data.list_sources()}


def test_unknown_source_is_a_clear_error():
    with pytest.raises(DataError, match="Unknown data source 'nope'"):
        data.read_text("nope")


def test_data_command_settings_round_trip_and_refuse_a_fetch_without_a_name():
    import argparse

    from core.lab import cli
    from core.stages import data_cmd

    for settings in (data_cmd.Settings(action="list"), data_cmd.Settings(action="fetch", name="the-verdict", timeout=3.0)):
        parser = argparse.ArgumentParser()
        cli.add_arguments(parser, data_cmd.Settings)
        assert cli.settings_from_args(data_cmd.Settings, parser.parse_args(cli.to_argv(settings))) == settings
    with pytest.raises(DataError, match="which source"):
        data_cmd.Settings(action="fetch")
    result = data_cmd.run(data_cmd.Settings(action="list"))
    assert {"python-docs", "tinyshakespeare"} <= {s["name"] for s in result["sources"]}


def test_the_preference_data_is_registered_and_checked(shared_data):
    path = data.locate("instruction-data-with-preference")
    assert path.name == "instruction-data-with-preference.json"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == data.SOURCES["instruction-data-with-preference"].sha256
    assert data.SOURCES["instruction-data-with-preference"].kind == "preferences"
