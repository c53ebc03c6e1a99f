"""`python -m core export`: a run's model in the layouts other tools open — a Hugging Face folder
(GPT-2 or Llama, to match the run) or one GGUF file for llama.cpp, Ollama and LM Studio.

    python -m core export --run my-run --format hf --out exported/my-run
    python -m core export --run my-run --format gguf --out exported/my-run.gguf

The folder (`config.json` + `model.safetensors`, plus our tokenizer as `glassbox_tokenizer.json`)
opens with `transformers` (`GPT2LMHeadModel` / `LlamaForCausalLM.from_pretrained(folder)`) and
imports back with `python -m core import --from folder`. The GGUF file carries the tokenizer too
(byte-level BPE only: a character or word tokenizer has no GGUF form) and the chat template.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from core.gpt.errors import GlassBoxError
from core.lab import gguf, runs
from core.lab.cli import option
from core.lab.gpt2 import is_gpt2_config, save_hf_gpt2
from core.lab.llama import is_llama_config, save_hf_llama
from core.lab.models import load_model_run

COMMAND = "export"
FORMATS = ("hf", "gguf")


@dataclass
class Settings:
    run: str | None = option(None, metavar="RUN", help="the run to export (it must hold a language model)")
    format: str = option("hf", choices=FORMATS,
                         help="hf: a Hugging Face folder (GPT-2 or Llama layout); gguf: one GGUF file")
    out: str | None = option(None, help="folder (hf) or file (gguf) to write")

    def __post_init__(self):
        if not self.run:
            raise GlassBoxError("Name the run to export with --run RUN.")
        runs.validate_run_id(self.run)
        if self.format not in FORMATS:
            raise GlassBoxError(f"Unknown format {self.format!r}: choose hf or gguf.")
        if not self.out:
            raise GlassBoxError("Say where to write it with --out (a folder for hf, a file for gguf).")


def architecture_of(config) -> str:
    """'gpt2' or 'llama': the standard layout that computes this model, or a clear error."""
    if is_gpt2_config(config):
        return "gpt2"
    if is_llama_config(config):
        return "llama"
    return gguf.gguf_architecture_of(config)  # raises, naming what is mixed


def run(settings: Settings, progress=None) -> dict:
    """Write the run; returns path, run_id, format, architecture."""
    model, tokenizer, config = load_model_run(settings.run)
    architecture = architecture_of(model.config)
    out = Path(settings.out).expanduser()
    if progress:
        progress({"message": f"writing {settings.run} ({architecture}) as {settings.format} to {out}"})
    if settings.format == "gguf":
        path = gguf.write_gguf(model, tokenizer, out, name=config.get("model_name") or settings.run,
                               chat_template=config.get("chat_template"))
    elif architecture == "llama":
        path = save_hf_llama(model, out, tokenizer)
    else:
        path = save_hf_gpt2(model, out, tokenizer)
    result = {"path": str(path.resolve()), "run_id": settings.run, "format": settings.format,
              "architecture": architecture}
    if settings.format == "gguf" and architecture == "gpt2" and model.config.gelu == "exact":
        result["note"] = ("llama.cpp's GPT-2 computes GELU's tanh approximation; this model was trained with the "
                          "exact GELU, so llama.cpp's logits differ from the run's a little "
                          "(by 3e-4 on a small random model here).")
    return result


def print_progress(record: dict) -> None:
    print(record.get("message", record), file=sys.stderr, flush=True)


CODE = {"gguf": [gguf.permute_rope_rows, gguf.write_gguf]}
