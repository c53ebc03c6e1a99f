"""`python -m core data list` and `python -m core data fetch NAME`: the data-source registry.

`list` says where each corpus and data set is found (or how to get it); `fetch` downloads one,
checked against its sha256, into the downloads folder.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from core.lab import data
from core.lab.cli import option
from core.lab.errors import DataError

COMMAND = "data"
FETCHABLE = tuple(n for n in data.SOURCES if n != "python-docs") + ("python-docs",)


@dataclass
class Settings:
    action: str = option(positional=True, choices=("list", "fetch"),
                         help="list: every source, where it is found and whether it is here; fetch: download NAME")
    name: str | None = option(None, positional=True, choices=FETCHABLE, help="the source to fetch")
    timeout: float = option(data.DOWNLOAD_TIMEOUT_S, help="seconds before a stalled download gives up")

    def __post_init__(self):
        if self.action not in ("list", "fetch"):
            raise DataError(f"Unknown action {self.action!r}: use `data list` or `data fetch NAME`.")
        if self.action == "fetch" and not self.name:
            raise DataError("Say which source to fetch: `python -m core data fetch NAME` (see `data list`).")


def print_progress(record: dict) -> None:
    if "line" in record:
        print(record["line"], file=sys.stderr)
        return
    done, total = record["done"], record["total"]
    shown = f"{done / 2**20:6.2f} / {total / 2**20:.2f} MB ({100 * done / total:3.0f}%)" if total \
        else f"{done / 2**20:6.2f} MB"
    print(f"\r  {shown}", end="" if done != total else "\n", file=sys.stderr, flush=True)


def run(settings: Settings, progress=None) -> dict:
    say = progress or (lambda record: None)
    if settings.action == "list":
        rows = data.list_sources()
        for row in rows:
            where = row["path"] or "not here (python -m core data fetch NAME)"
            say({"line": f"{row['name']:<32} {row['bytes'] or 0:>9} B  {where}"})
        return {"sources": [{"name": r["name"], "path": r["path"], "bytes": r["bytes"],
                             "available": r["available"]} for r in rows]}
    say({"line": f"fetching {settings.name} …"})
    path = data.fetch(settings.name, progress=lambda done, total: say({"done": done, "total": total}),
                      timeout=settings.timeout)
    return {"name": settings.name, "path": str(path), "bytes": path.stat().st_size}
