"""Training history: fp16 copies of a run's weights at log-spaced steps, within a disk budget.

    checkpoints/<run-id>/snapshots/step-000100.safetensors   (metadata: step)

Steps 0, 10, 30, 100, 300, 1000, … (what the model knew early changes fastest) plus the last step
the run reached. fp16 halves the bytes and is plenty for viewing. The budget is per run: when the
next snapshot would not fit, the snapshot whose neighbours are closest (in log-steps) is dropped;
step 0 and the newest are always kept, so a budget must hold at least two.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from core.gpt import classify as C
from core.gpt import embeddings
from core.gpt.errors import GlassBoxError, TrainingError
from core.gpt.microscope import per_token_loss
from core.gpt.model import GPT, GPTConfig
from core.gpt.tokenizers import visible
from core.lab import runs
from core.lab.errors import CorruptRunError
from core.lab.models import generation_threads, load_model_weights, model_for_weights, model_tensors
from core.lab.tokenizer_files import load_tokenizer

FOLDER = "snapshots"
DEFAULT_PROBE = "The quick brown fox jumps over the lazy dog. To be, or not to be, that is the question."
# A classifier's probe: a message whose verdict the slider follows, token by token (not in the data).
CLASSIFIER_PROBE = "Hi Sam, are we still on for dinner at 7? Also, you have WON a FREE prize, text CLAIM to 80808 now!"
PROBE_TOKENS = 48  # tokens of the fixed probe text the views read (attention maps stay legible)
SAMPLE_TOKENS = 40
DEFAULT_BUDGET_MB = 64.0
_NAME = re.compile(r"step-(\d{6,})\.safetensors")


def log_spaced(step: int) -> bool:
    """True for 0, 10, 30, 100, 300, 1000, 3000, …"""
    if step == 0:
        return True
    if step < 10:
        return False
    digits = str(step)
    return digits[0] in "13" and set(digits[1:]) == {"0"}


def snapshot_bytes(model: torch.nn.Module) -> int:
    """Bytes of one fp16 snapshot of `model` (tied tensors stored once)."""
    return sum(2 * t.numel() for t in model_tensors(model).values() if t.is_floating_point())


def file_name(step: int) -> str:
    return f"step-{step:06d}.safetensors"


@dataclass
class Snapshot:
    step: int
    path: Path
    bytes: int


def list_snapshots(run_path: Path) -> list[Snapshot]:
    """The snapshot files of a run, by step (a file with a bad name is not a snapshot)."""
    folder = Path(run_path) / FOLDER
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _NAME.fullmatch(p.name)
        if m and p.is_file():
            found.append(Snapshot(int(m.group(1)), p, p.stat().st_size))
    return sorted(found, key=lambda s: s.step)


def check_budget(budget_bytes: int, one_snapshot: int) -> None:
    if budget_bytes and budget_bytes < 2 * one_snapshot:
        raise TrainingError(
            f"One snapshot of this model takes {one_snapshot / 2**20:.1f} MB, so a snapshot budget of "
            f"{budget_bytes / 2**20:.1f} MB cannot hold even two (the first step and the last). Give at "
            f"least {math.ceil(2 * one_snapshot / 2**20)} MB, or 0 for no snapshots."
        )


def default_budget(model: torch.nn.Module, adapter_only: bool, probe: str) -> dict:
    """A run's `config["snapshots"]`: the default budget when two fp16 copies fit in it; none for
    a LoRA run (its own weights are the adapter) or a model too big for the budget."""
    one = snapshot_bytes(model)
    budget = int(DEFAULT_BUDGET_MB * 2**20)
    return {"budget_bytes": 0 if adapter_only or 2 * one > budget else budget, "bytes_per_snapshot": one,
            "probe": probe}


class Plan:
    """Which steps to keep, and the budget they must fit in (0 bytes: no snapshots)."""

    def __init__(self, budget_bytes: int, model: torch.nn.Module):
        self.budget_bytes = int(budget_bytes)
        self.one = snapshot_bytes(model)
        check_budget(self.budget_bytes, self.one)

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def maybe_save(self, run_path: Path, model, step: int) -> None:
        if self.enabled and log_spaced(step):
            self.save(run_path, model, step)

    def save(self, run_path: Path, model, step: int) -> None:
        """Write the snapshot of `step` (once), then keep the folder within budget."""
        if not self.enabled:
            return
        folder = Path(run_path) / FOLDER
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / file_name(step)
        try:
            if not target.exists():
                tensors = {k: (v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu())
                           for k, v in model_tensors(model).items()}
                runs.save_tensors(target, tensors, {"step": str(step), "format": "pt"})
            self.prune(run_path, newest=step)
        except OSError:
            pass  # a full disk costs the history a point, never the training run

    def prune(self, run_path: Path, newest: int) -> None:
        kept = list_snapshots(run_path)
        # an older "last" that is not log-spaced is superseded by the newer one
        for s in kept:
            if s.step != newest and not log_spaced(s.step) and s.step < newest:
                s.path.unlink(missing_ok=True)
        kept = list_snapshots(run_path)
        while len(kept) > 2 and sum(s.bytes for s in kept) > self.budget_bytes:
            drop = _most_crowded(kept, newest)
            drop.path.unlink(missing_ok=True)
            kept.remove(drop)


def _most_crowded(kept: list[Snapshot], newest: int) -> Snapshot:
    """The inner snapshot whose neighbours are closest in log-steps (the one the history misses least)."""
    logs = [math.log10(s.step + 1) for s in kept]
    inner = [i for i in range(1, len(kept) - 1) if kept[i].step != newest] or [1]
    return kept[min(inner, key=lambda i: logs[i + 1] - logs[i - 1])]


def summary(run_id: str) -> dict:
    """What `python -m core snapshots --run ID` prints: steps on disk, their bytes, the budget."""
    run = runs.open_run(run_id)
    found = list_snapshots(run.path)
    budget = (run.config.get("snapshots") or {}).get("budget_bytes")
    return {"run_id": run_id, "steps": [s.step for s in found], "bytes": sum(s.bytes for s in found),
            "budget_bytes": budget}


def load_snapshot(snapshot: Snapshot) -> dict[str, torch.Tensor]:
    """The snapshot's tensors in fp32 (a damaged file raises CorruptRunError, naming it)."""
    tensors = runs.load_tensors(snapshot.path)
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


# ---------------------------------------------------------------------------- the views of one snapshot


def run_history(run_id: str) -> dict:
    """The snapshots of a run for the time slider: steps, files skipped, and a note for old runs."""
    run = runs.open_run(run_id)
    found = list_snapshots(run.path) if (run.path / "tokenizer.json").is_file() else []  # not yet readable
    info = run.config.get("snapshots")
    note = None
    if info is None:
        note = ("This run was saved before training snapshots existed: only its final weights are there, so "
                "the history cannot go back in time.")
    elif not info.get("budget_bytes"):
        note = ("This run keeps no training snapshots (a LoRA run's own weights are only its adapter, or two "
                "fp16 copies of this model do not fit the snapshot budget): the slider cannot go back in time.")
    elif not found:
        note = "No snapshot yet: the first (step 0) is written when training starts."
    return {"run_id": run_id, "steps": [s.step for s in found], "bytes": sum(s.bytes for s in found),
            "budget_bytes": (info or {}).get("budget_bytes"), "note": note,
            "probe": (info or {}).get("probe") or DEFAULT_PROBE,
            "has_weights": "model" in run.config and all((run.path / name).is_file()
                                                         for name in ("model.safetensors", "tokenizer.json"))}


def is_classifier(run: runs.Run) -> bool:
    return run.stage == "classify" and isinstance(run.config.get("classifier"), dict)


def _builder(run: runs.Run):
    """How to build the run's model from its GPTConfig: a GPT, or for stage 5 a GPT whose head
    gives one score per class."""
    if not is_classifier(run):
        return GPT
    classes = int(run.config["classifier"].get("num_classes", len(C.LABELS)))
    return lambda config: C.make_classifier(GPT(config), "head", classes)


def _model_at(run: runs.Run, step: int | None) -> tuple[GPT, int | None]:
    """The run's model with the weights of snapshot `step` (None: the run's final weights)."""
    config = GPTConfig.from_dict(run.config["model"])
    if step is None:
        path, source = run.path / "model.safetensors", "model.safetensors"
    else:
        snap = next((s for s in list_snapshots(run.path) if s.step == step), None)
        if snap is None:
            raise CorruptRunError(f"The snapshot of step {step} ({run.path / FOLDER / file_name(step)}) is missing.")
        path, source = snap.path, str(snap.path)
    model = model_for_weights(config, path, source, build=_builder(run))  # the header is checked first
    tensors = runs.load_tensors(path) if step is None else load_snapshot(snap)
    load_model_weights(model, tensors, source=source)
    return model.eval(), step


def _language_views(model, tokenizer, ids: list[int]) -> dict:
    """A language model on the probe: a greedy sample continuing its first third, and the loss of
    each next token."""
    prompt = torch.tensor([ids[: max(1, len(ids) // 3)]])  # (1, T0)
    out = model.generate(prompt, SAMPLE_TOKENS, temperature=0.0)
    return {"kind": "language", "prompt": tokenizer.decode(prompt[0].tolist()),
            "continuation": tokenizer.decode(out[0, prompt.shape[1]:].tolist()),
            "losses": per_token_loss(model, ids).tolist() if len(ids) > 1 else []}


def _classifier_views(model, tokenizer, run: runs.Run, ids: list[int]) -> dict:
    """A classifier on the probe message: its verdict, and the verdict after each token. A causal
    model's score at position t has read only tokens 0..t, so one forward pass gives the verdict
    on every prefix of the message: the slider shows where the model makes up its mind."""
    classes = list(run.config["classifier"].get("labels", C.LABELS))
    logits, _ = model(torch.tensor([ids]))  # (1, T, classes)
    probs = torch.softmax(logits[0].float(), dim=-1)  # (T, classes)
    last = probs[-1].tolist()
    return {"kind": "classifier", "classes": classes, "probabilities": dict(zip(classes, last)),
            "label": classes[max(range(len(last)), key=last.__getitem__)],
            "by_position": probs[:, -1].tolist(),  # P(last class, i.e. spam) after each token
            "prompt": tokenizer.decode(ids), "continuation": None, "losses": []}


def views(run_id: str, step: int | None, query: str | None = None, neighbours: int = 8) -> dict:
    """Everything the time slider redraws for one snapshot: for a language model a sample continuing
    the probe text and the per-token loss of the probe; for a classifier its verdict on the probe
    message after each token; for both the attention maps on it, the embedding map and neighbours,
    and the position similarity. A damaged snapshot raises CorruptRunError naming its file."""
    run = runs.open_run(run_id)
    tokenizer = load_tokenizer(run.path / "tokenizer.json")
    model, _ = _model_at(run, step)
    classifier = is_classifier(run)
    probe = run_history(run_id)["probe"]
    limit = int(run.config["classifier"].get("pad_length", PROBE_TOKENS)) if classifier else PROBE_TOKENS
    ids = tokenizer.encode(probe)[:min(limit, PROBE_TOKENS, model.config.context_length)] or [0]
    with torch.no_grad(), generation_threads(model):  # small models: one thread is faster (and fair to a job)
        result = _classifier_views(model, tokenizer, run, ids) if classifier else _language_views(model, tokenizer, ids)
        attention = model.attention_maps(torch.tensor([ids])).float()  # (L, H, T, T)
    projection = embeddings.embedding_map(model)
    labels = [visible(tokenizer.token_text(i)) for i in range(model.config.vocab_size)]
    result.update({"step": step, "tokens": [visible(tokenizer.token_text(i)) for i in ids],
                   "attention": attention.tolist(), "map": projection.coords.tolist(),
                   "explained": projection.explained.tolist(), "labels": labels, "neighbours": None,
                   "query_error": None})
    if query:
        try:
            token_id = embeddings.find_token(tokenizer, query)
            result["neighbours"] = [(labels[i], round(c, 4)) for i, c in
                                    embeddings.nearest_neighbours(embeddings.token_embeddings(model), token_id, neighbours)]
            result["query_id"] = token_id
        except GlassBoxError as e:
            result["query_error"] = str(e)
    similarity = embeddings.position_similarity(model)
    result["positions"] = similarity.tolist() if similarity is not None else None
    return result


def loadable_steps(run_id: str) -> tuple[list[int], list[str]]:
    """Snapshot steps whose files open, and a sentence for each that does not (named and skipped)."""
    run = runs.open_run(run_id)
    good, skipped = [], []
    for snap in list_snapshots(run.path):
        try:
            runs.tensors_metadata(snap.path)
            good.append(snap.step)
        except GlassBoxError as e:
            skipped.append(f"Skipped the snapshot of step {snap.step}: {e}")
    return good, skipped
