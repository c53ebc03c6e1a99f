"""Where Glass Box keeps things on disk.

Everything the app writes lives under two folders, both configurable through the environment so
that tests (and classroom servers) can point them elsewhere:

- checkpoints: `GLASSBOX_CHECKPOINTS_DIR`, default `<repo>/checkpoints` — the run store.
- downloads:   `GLASSBOX_DOWNLOADS_DIR`,   default `<repo>/data` — downloaded and uploaded data.

`GLASSBOX_DATA_DIR` names extra folders (separated by `os.pathsep`) searched for data files by
their registry file name before anything is downloaded; CI sets it to `../shared/data`.
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def checkpoints_dir() -> Path:
    return Path(os.environ.get("GLASSBOX_CHECKPOINTS_DIR") or REPO_ROOT / "checkpoints")


def downloads_dir() -> Path:
    return Path(os.environ.get("GLASSBOX_DOWNLOADS_DIR") or REPO_ROOT / "data")


def search_dirs() -> list[Path]:
    """Folders searched for data files, in order: GLASSBOX_DATA_DIR entries, then downloads."""
    extra = os.environ.get("GLASSBOX_DATA_DIR", "")
    dirs = [Path(p) for p in extra.split(os.pathsep) if p.strip()]
    return dirs + [downloads_dir()]
