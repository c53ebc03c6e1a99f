"""`python -m core import-gpt2`: GPT-2 weights from a Hugging Face folder into the run store.

    python -m core import-gpt2 --from path/to/gpt2 --run-id gpt2-small
    python -m core import-gpt2 --download openai-community/gpt2 --run-id gpt2-small   # online only

The folder holds `config.json` and `model.safetensors` (what `save_pretrained` writes, or what the
hub serves). The run (stage "import") can then be opened by every later page.
"""

from __future__ import annotations

import sys

from core.gpt.errors import GlassBoxError
from core.lab.errors import RunExistsError


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from", dest="folder", help="folder with config.json + model.safetensors")
    source.add_argument("--download", metavar="NAME",
                        help="download from the Hugging Face hub first (online), e.g. openai-community/gpt2")
    parser.add_argument("--run-id", default=None, help="name of the run to create (default: import-<time>)")


def _progress_printer():
    """Print download progress every 10% (or every 64 MiB when the size is unknown)."""
    last = {"step": -1}

    def progress(done: int, total: int, filename: str) -> None:
        step = done * 10 // total if total else done >> 26
        if step != last["step"]:
            last["step"] = step
            size = f"/{total / 2**20:.0f}" if total else ""
            print(f"{filename}: {done / 2**20:.0f}{size} MiB", file=sys.stderr, flush=True)

    return progress


def run(args) -> dict:
    from core.lab import runs
    from core.lab.gpt2 import download_gpt2, import_gpt2

    run_id = runs.validate_run_id(args.run_id) if args.run_id else runs.new_run_id("import")
    if (runs.run_dir(run_id) / "config.json").exists():
        raise RunExistsError(f"A run named {run_id!r} already exists: choose another name.")
    folder = args.folder
    if args.download:
        folder = download_gpt2(args.download, progress=_progress_printer())
    if folder is None:
        raise GlassBoxError("Give --from FOLDER or --download NAME.")
    return import_gpt2(folder, run_id, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
