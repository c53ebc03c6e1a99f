"""`python -m core export`: a run's model in the Hugging Face GPT-2 layout.

    python -m core export --run my-run --format hf --out exported/my-run

The folder (`config.json` + `model.safetensors`, plus our tokenizer as `glassbox_tokenizer.json`)
opens with `transformers.GPT2LMHeadModel.from_pretrained(folder)` and imports back with
`python -m core import-gpt2 --from folder`.
"""

from __future__ import annotations

import sys


def add_arguments(parser) -> None:
    parser.add_argument("--run", required=True, help="the run to export (it must hold a language model)")
    parser.add_argument("--format", choices=["hf"], default="hf", help="hf: Hugging Face GPT-2 (the only one)")
    parser.add_argument("--out", required=True, help="folder to write (created if missing)")


def run(args) -> dict:
    from core.lab.gpt2 import export_run

    path = export_run(args.run, args.out)
    print(f"wrote {path}", file=sys.stderr)
    return {"path": str(path.resolve()), "run_id": args.run, "format": args.format}
