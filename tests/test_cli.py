"""The command-line contract: JSON last line on success; one-line error and exit 2 on a mistake."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.__main__ import COMMANDS, main

REPO = Path(__file__).resolve().parent.parent

BAD_INVOCATIONS = [
    ["nope"],
    ["data", "fetch", "nope"],
    ["tokenize", "--data", "nope", "--tokenizer", "bpe", "--vocab-size", "1000", "--run-id", "t"],
    ["tokenize", "--data", "python-docs", "--tokenizer", "bpe", "--vocab-size", "100", "--run-id", "t"],
    ["tokenize", "--data", "python-docs", "--tokenizer", "char", "--run-id", "../escape"],
    ["tokenize", "--data", "upload:missing.txt", "--tokenizer", "char", "--run-id", "t"],
    ["attention", "--text", ""],
    ["attention", "--text", "a b c", "--heads", "-2"],
    ["inspect", "--preset", "no-such-preset"],
    ["inspect", "--run", "no-such-run"],
    ["pretrain", "--data", "the-verdict", "--tokenizer", "char", "--preset", "tiny", "--steps", "2",
     "--lr", "nan", "--run-id", "p"],
    ["pretrain", "--data", "the-verdict", "--tokenizer", "char", "--preset", "tiny", "--steps", "2",
     "--lr", "-1", "--run-id", "p"],
    ["pretrain", "--data", "the-verdict", "--tokenizer", "no-such-run", "--preset", "tiny", "--steps", "2",
     "--run-id", "p"],
    ["classify", "--from", "no-such-run", "--data", "sms-spam", "--steps", "2", "--run-id", "c"],
    ["instruct", "--from", "no-such-run", "--data", "instruction-data", "--steps", "2", "--run-id", "i"],
    ["judge", "--run", "no-such-run", "--base-url", "http://127.0.0.1:9/v1", "--model", "m", "--run-id", "j"],
    ["import-gpt2", "--from", "/nonexistent/folder", "--run-id", "g"],
    ["export", "--run", "no-such-run", "--format", "hf", "--out", "/tmp/glassbox-export-test"],
]


@pytest.mark.parametrize("argv", BAD_INVOCATIONS, ids=lambda a: " ".join(a)[:60])
def test_user_mistakes_give_one_line_and_exit_2(argv, capsys):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ")  # progress may come before it; the error is one line
    assert sum(line.startswith("error: ") for line in lines) == 1
    assert out == ""


def test_every_command_has_help():
    for command in COMMANDS:
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0


def test_real_process_prints_json_last_line_and_error_exit_code():
    ok = subprocess.run([sys.executable, "-m", "core", "data", "list"], cwd=REPO,
                        capture_output=True, text=True, check=True)
    last = json.loads(ok.stdout.strip().splitlines()[-1])
    assert {"name", "path", "bytes"} <= set(last["sources"][0])
    bad = subprocess.run([sys.executable, "-m", "core", "data", "fetch", "nope"], cwd=REPO,
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
