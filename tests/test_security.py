"""Security: nothing a user supplies is unpickled; ids, names and links cannot escape their folders."""

import ast
import base64
import json
import pickle
import time
from pathlib import Path

import pytest

from core.lab import data, runs
from core.lab.errors import CorruptRunError, DataError, RunError

REPO = Path(__file__).resolve().parent.parent


class _Exploit:
    """Unpickling this would create a file: proof that something ran user-supplied code."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_no_pickle_or_unsafe_torch_load_in_the_code():
    offenders = []
    for path in list((REPO / "core").rglob("*.py")) + list((REPO / "pages").glob("*.py")) + [REPO / "app.py"]:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                if any(n in ("pickle", "dill", "cloudpickle", "joblib") for n in names):
                    offenders.append(f"{path.name}: imports pickle")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = node.func.value
                if isinstance(owner, ast.Name) and owner.id == "torch":
                    safe = any(k.arg == "weights_only" and getattr(k.value, "value", None) is True
                               for k in node.keywords)
                    if not safe:
                        offenders.append(f"{path.name}:{node.lineno}: torch.load without weights_only=True")
    assert offenders == []


@pytest.mark.parametrize("filename", ["model.safetensors", "train_state.safetensors"])
def test_a_malicious_pickle_in_a_run_is_never_executed(tmp_path, filename):
    sentinel = tmp_path / "pwned"
    run = runs.create_run("evil", "pretrain", {})
    (run.path / filename).write_bytes(pickle.dumps(_Exploit(sentinel)))
    with pytest.raises(CorruptRunError, match=filename):
        runs.load_tensors(run.path / filename)
    assert not sentinel.exists()


def test_a_symlinked_run_folder_is_refused(tmp_path, isolated_workspace):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text('{"stage": "pretrain"}')
    (isolated_workspace["checkpoints"] / "linked").symlink_to(outside, target_is_directory=True)
    with pytest.raises(RunError, match="symbolic link"):
        runs.open_run("linked")
    assert [r.id for r in runs.list_runs()] == []
    with pytest.raises(RunError):
        runs.delete_run("linked")
    assert (outside / "config.json").exists()


def test_a_symlinked_upload_is_refused(tmp_path, isolated_workspace):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    uploads = isolated_workspace["downloads"] / "uploads"
    uploads.mkdir()
    (uploads / "notes.txt").symlink_to(secret)
    with pytest.raises(DataError):
        data.read_text("upload:notes.txt")


# ------------------------------------------------------------------ planted run folders (issue 22)


def _planted_tokenizer(isolated_workspace, content: dict):
    from core.lab.tokenizer_files import load_tokenizer

    path = isolated_workspace["checkpoints"] / "planted" / "tokenizer.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(content))
    return lambda: load_tokenizer(path)


@pytest.mark.parametrize("kind", ["bpe", "bytelevel"])
def test_a_planted_split_pattern_is_refused_not_run(isolated_workspace, kind):
    """A pattern from a file is code run on every text: "(a+)+$" backtracks for minutes on 30 a's."""
    from core.gpt.errors import TokenizerError

    content = {"kind": kind, "pattern": "(a|aa)+$", "merges": []}
    if kind == "bytelevel":
        content.update(ranks=[[base64.b64encode(bytes([b])).decode(), b] for b in range(256)],
                       special_tokens={"<|endoftext|>": 256})
    load = _planted_tokenizer(isolated_workspace, content)
    started = time.perf_counter()
    with pytest.raises(TokenizerError, match="split pattern is not one this app knows"):
        load()
    assert time.perf_counter() - started < 5


def test_planted_merges_that_double_their_tokens_are_refused(isolated_workspace):
    """Twenty merges of a token with itself would build a 1 MiB token (2**20 bytes) in 20 lines."""
    from core.gpt.errors import TokenizerError

    merges = [[97, 97]] + [[256 + i, 256 + i] for i in range(20)]
    load = _planted_tokenizer(isolated_workspace, {"kind": "bpe", "merges": merges})
    with pytest.raises(TokenizerError, match="builds a token of 2,048 bytes"):
        load()
    from core.lab.tokenizer_files import tokenizer_from_dict

    ordinary = tokenizer_from_dict({"kind": "bpe", "merges": [[97, 98], [256, 99]]})  # "ab", then "abc"
    assert ordinary.decode([257]) == "abc"


def test_a_planted_model_config_is_checked_before_the_model_is_built(isolated_workspace):
    """config.json says n_embd 2**20 (13 TB of weights) beside a tiny weights file: the run is
    refused from the file's header, before a byte of the model is allocated."""
    import torch

    from core.gpt.model import GPT, GPTConfig
    from core.gpt.tokenizers import train_char
    from core.lab import models, runs
    from core.lab.errors import CorruptRunError

    tokenizer = train_char("abcdefgh ")
    small = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=16, n_embd=16, n_head=2, n_layer=1))
    runs.create_run("planted-config", "pretrain", {})
    models.save_model_run("planted-config", small, tokenizer)
    config_path = runs.run_dir("planted-config") / "config.json"
    config = json.loads(config_path.read_text())
    config["model"]["n_embd"] = 2**20
    config_path.write_text(json.dumps(config))
    with pytest.raises(CorruptRunError, match=r"has shape \(16,\) but the model config needs \(1048576,\)"):
        models.load_model_run("planted-config")
    config["model"]["n_embd"] = 16  # the honest config still loads, to the same logits
    config_path.write_text(json.dumps(config))
    model, _, _ = models.load_model_run("planted-config")
    x = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.equal(model(x)[0], small.eval()(x)[0])
