"""A shared server's limits (core/lab/limits.py): the longest job the app may start, and the folders
the app's import may read (issue 22's "single job slot held for days" and "import reads any path")."""

import os

import pytest

from core.lab import jobs, limits, runs
from core.lab.errors import JobError
from core.stages import classify, pretrain


def test_a_job_above_the_servers_budget_is_refused_before_anything_starts(monkeypatch):
    huge = pretrain.Settings(data="tinyshakespeare", preset="tiny", steps=200_000)
    with pytest.raises(JobError, match=r"at most 20,000 steps per job \(you asked for 200,000\); set by GLASSBOX_MAX_JOB_STEPS"):
        jobs.start_stage(pretrain.COMMAND, huge, "long")
    with pytest.raises(JobError, match="at most 120 minutes per job"):
        jobs.start_stage(classify.COMMAND, classify.Settings(start="base", minutes=10_000), "long")
    assert not runs.run_dir("long").exists()  # nothing was created, nothing queued
    monkeypatch.setenv("GLASSBOX_MAX_JOB_MINUTES", "5")
    with pytest.raises(JobError, match="at most 5 minutes"):
        limits.check_job_budget(classify.Settings(start="base", minutes=6))
    limits.check_job_budget(classify.Settings(start="base", minutes=5))  # at the limit is allowed
    monkeypatch.setenv("GLASSBOX_MAX_JOB_MINUTES", "nan")  # unreadable: the safe default, not "no limit"
    assert limits.limit("GLASSBOX_MAX_JOB_MINUTES") == 120.0


def test_the_import_reads_only_allowed_folders_and_says_nothing_about_others(tmp_path, monkeypatch):
    allowed, other = tmp_path / "models", tmp_path / "private"
    (allowed / "gpt2").mkdir(parents=True)
    (other / "secret").mkdir(parents=True)
    (allowed / "escape").symlink_to(other / "secret")
    monkeypatch.setenv("GLASSBOX_IMPORT_DIRS", str(allowed))
    assert limits.check_import_path(allowed / "gpt2") == (allowed / "gpt2").resolve()
    assert limits.check_import_path(limits.downloads_dir()) == limits.downloads_dir().resolve()  # always allowed
    refused = set()
    for path in (other / "secret", other / "nothing-here", allowed / ".." / "private", allowed / "escape", "~", "/etc"):
        with pytest.raises(limits.ImportPathError) as e:
            limits.check_import_path(path)
        refused.add(str(e.value))
    assert refused == {limits.IMPORT_REFUSED}  # the same sentence whether the folder exists or not
    monkeypatch.delenv("GLASSBOX_IMPORT_DIRS")
    with pytest.raises(limits.ImportPathError):
        limits.check_import_path(allowed / "gpt2")  # by default only the downloads folder
    assert os.pathsep not in limits.IMPORT_REFUSED


@pytest.mark.parametrize("eps", ["tiny", "1e-5; rm -rf", float("nan"), -1.0, None])
def test_a_planted_layer_norm_epsilon_is_a_clear_error_not_a_traceback(eps):
    """Issue 22's review: a string `layer_norm_epsilon` raised an uncaught ValueError on page 3."""
    from core.lab.gpt2 import GPT2FormatError, config_from_hf

    with pytest.raises(GPT2FormatError, match="not a number|positive number|built"):
        config_from_hf({"model_type": "gpt2", "n_embd": 8, "n_head": 2, "n_layer": 1, "vocab_size": 16,
                        "n_positions": 8, "layer_norm_epsilon": eps})
