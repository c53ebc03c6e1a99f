"""`python -m core data list` and `python -m core data fetch NAME`: the data-source registry."""

import sys

from core.lab import data


def add_arguments(parser):
    sub = parser.add_subparsers(dest="action", required=True)
    sub.add_parser("list", help="list every source, where it is found and whether it is here")
    fetch = sub.add_parser("fetch", help="download a source (checked against its sha256)")
    fetch.add_argument("name", choices=[n for n in data.SOURCES if n != "python-docs"] + ["python-docs"])
    fetch.add_argument("--timeout", type=float, default=data.DOWNLOAD_TIMEOUT_S)


def _progress(done: int, total: int | None) -> None:
    if total:
        print(f"\r  {done / 2**20:6.2f} / {total / 2**20:.2f} MB ({100 * done / total:3.0f}%)",
              end="", file=sys.stderr, flush=True)
    else:
        print(f"\r  {done / 2**20:6.2f} MB", end="", file=sys.stderr, flush=True)


def run(args) -> dict:
    if args.action == "list":
        rows = data.list_sources()
        for row in rows:
            where = row["path"] or "not here (python -m core data fetch NAME)"
            print(f"{row['name']:<32} {row['bytes'] or 0:>9} B  {where}", file=sys.stderr)
        return {"sources": [{"name": r["name"], "path": r["path"], "bytes": r["bytes"],
                             "available": r["available"]} for r in rows]}
    print(f"fetching {args.name} …", file=sys.stderr)
    path = data.fetch(args.name, progress=_progress, timeout=args.timeout)
    print(file=sys.stderr)
    return {"name": args.name, "path": str(path), "bytes": path.stat().st_size}
