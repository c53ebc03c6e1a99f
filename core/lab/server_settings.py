"""A shared server's settings, in one file: `.streamlit/classroom.toml` (or `GLASSBOX_SETTINGS`).

The file documents every setting with its safe default, all commented out; uncomment one to change
it. Each key is the name of an environment variable without its `GLASSBOX_` prefix, lower case
(`max_job_minutes` → `GLASSBOX_MAX_JOB_MINUTES`), and the code reads the variable: so the file
and the environment are one mechanism, and a variable set in the shell wins over the file.

`apply()` runs when the app starts and when `python -m core` starts; background jobs inherit the
result. Secrets (the teacher's key, API keys) are never read from this file: they stay in the
environment, where they are never written to disk.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from core.lab.errors import GlassBoxError
from core.lab.paths import REPO_ROOT

SETTINGS_ENV = "GLASSBOX_SETTINGS"
DEFAULT_FILE = REPO_ROOT / ".streamlit" / "classroom.toml"

# key → kind. Lists become comma-separated variables (import_dirs: os.pathsep-separated).
KEYS: dict[str, type] = {
    "classroom": bool, "max_jobs": int, "job_nice": int, "max_jobs_per_learner": int, "max_job_minutes": float,
    "max_job_steps": int, "max_job_tokens": int, "import_dirs": list, "judge_endpoints": list,
    "judge_allow_hosts": list, "judge_key_url": str, "judge_max_failures": int, "judge_give_up_s": float,
    "leaderboard_minutes": float,
}
SECRET_KEYS = ("teacher_key", "openai_api_key", "judge_api_key")


class SettingsError(GlassBoxError):
    """The settings file is unreadable, or names a setting that does not exist."""


def settings_file() -> Path:
    return Path(os.environ.get(SETTINGS_ENV) or DEFAULT_FILE)


def read(path: Path | None = None) -> dict[str, str]:
    """The settings the file sets, as environment variables (name → value)."""
    path = Path(path) if path else settings_file()
    if not path.is_file():
        if path != DEFAULT_FILE:
            raise SettingsError(f"The settings file {path} ({SETTINGS_ENV}) does not exist.")
        return {}
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path} is not valid TOML: {e}") from None
    table = table.get("glassbox", table)
    found = {}
    for key, value in table.items():
        if key in SECRET_KEYS:
            raise SettingsError(f"{path}: {key!r} is a secret; set GLASSBOX_{key.upper()} in the "
                                "environment instead, so it never sits in a file.")
        kind = KEYS.get(key)
        if kind is None:
            raise SettingsError(f"{path}: unknown setting {key!r}; the settings are {', '.join(KEYS)}.")
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value) if kind is list else (
            isinstance(value, kind) or (kind is float and isinstance(value, int))) and not (
            kind is not bool and isinstance(value, bool))
        if not ok:
            raise SettingsError(f"{path}: {key} must be {'a list of strings' if kind is list else kind.__name__}"
                                f", not {value!r}.")
        sep = os.pathsep if key == "import_dirs" else ","
        text = sep.join(value) if kind is list else ("1" if value is True else "0" if value is False else str(value))
        found[f"GLASSBOX_{key.upper()}"] = text
    return found


def apply(path: Path | None = None) -> dict[str, str]:
    """Put the file's settings into this process's environment, where the shell has not set them."""
    found = read(path)
    for name, value in found.items():
        os.environ.setdefault(name, value)
    return found
