"""Security: nothing a user supplies is unpickled; ids, names and links cannot escape their folders."""

import ast
import pickle
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
