"""Generation one token at a time, with the next token's probabilities three ways at every step.

    python -m core generate --run my-run --prompt "To be" --max-new-tokens 20 --temperature 0.8 --top-k 40
    python -m core generate --run tuned --prompt "Name a colour." --force 464,3124   # a branch

The last stdout line is JSON: `text`, `steps` (each: `token`, `rank`, `entropy`, `top` = list of
`{token, p_raw, p_temperature, p_kept}`), and the KV cache's figures. This module also opens a run
for the microscope (`open_subject`): `surprise` and `lens` use it too.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from core.gpt import microscope
from core.gpt.errors import GlassBoxError
from core.gpt import chat
from core.gpt.generate import check_sampling, filtered_probabilities, next_logits
from core.lab import models, runs
from core.lab.cli import option
from core.lab.errors import RunError

COMMAND = "generate"
TEMPLATES = ("auto", "none", "alpaca", "chatml")
MAX_NEW_TOKENS = 1000


class NotALanguageModel(RunError):
    """The run's weights do not end in a language-model head (a classifier, a tokenizer run...)."""


# ---------------------------------------------------------------------------- a run under the microscope


@dataclass
class Subject:
    """A loaded run: the model, its tokenizer and the prompt template its prompts go in."""

    run_id: str
    model: object
    tokenizer: object
    template: str  # "none", "alpaca" (instruction-tuned here) or "chatml" (an imported chat model)
    config: dict

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    def label(self, token_id: int) -> str:
        """The readable text of one token ('<id N>' for ids past the tokenizer's vocabulary)."""
        if 0 <= token_id < self.tokenizer.vocab_size:
            return self.tokenizer.token_text(int(token_id))
        return f"<id {int(token_id)}>"


def default_template(stage: str | None, tokenizer) -> str:
    """Instruction-tuned runs answer in the Alpaca template; a model whose vocabulary has ChatML's
    markers as special tokens (SmolLM2-Instruct) in ChatML; anything else continues plain text."""
    if stage == "instruct":
        return "alpaca"
    if chat.template_for(tokenizer).name == "chatml":
        return "chatml"
    return "none"


def open_subject(run_id: str) -> Subject:
    """Load a run that holds a language model, or say clearly why it cannot be used."""
    if not run_id:
        raise GlassBoxError("Name a run that holds a language model (--run RUN).")
    run = runs.open_run(run_id)
    if run.error:
        raise RunError(f"Run {run_id!r} is damaged: {run.error}")
    if "classifier" in run.config or run.stage == "classify":
        raise NotALanguageModel(
            f"Run {run_id!r} is a classifier: its output head scores {run.config.get('classifier', {}).get('num_classes', 2)} "
            "classes, not the next token, so there is nothing to generate or to read through the lens. "
            "Choose the run it was fine-tuned from, or any pre-trained, imported or instruction-tuned run.")
    if not models.is_language_model_run(run):
        raise NotALanguageModel(
            f"Run {run_id!r} ({run.stage or 'no stage'}) holds no language model with weights yet.")
    model, tokenizer, config = models.load_model_run(run_id)
    return Subject(run_id, model, tokenizer, default_template(run.stage, tokenizer), config)


def wrap_prompt(prompt: str, template: str) -> str:
    """The prompt as the model was tuned to see it: one user turn in its chat template (core.gpt.chat)."""
    if template == "none":
        return prompt
    return chat.TEMPLATES[template].render([{"role": "user", "content": prompt}])


def stop_ids(subject: Subject, template: str) -> tuple[int, ...]:
    """Tokens that end a generation: end-of-text, and the template's end-of-turn markers."""
    found = {subject.tokenizer.eot_id} if getattr(subject.tokenizer, "eot_id", None) is not None else set()
    if template != "none":
        found |= chat.stop_ids(subject.tokenizer, chat.TEMPLATES[template])
    return tuple(sorted(found))


def encode(subject: Subject, text: str, keep: str = "end") -> tuple[list[int], str]:
    """Token ids of `text`, cut to the context length, and a sentence saying what was cut ('' if nothing).

    keep="end" keeps the last tokens (a prompt to continue); keep="start" the first (a text to score).
    """
    if not text or not text.strip():
        raise microscope.MicroscopeError("The text is empty: type a few words.")
    return fit(subject, subject.tokenizer.encode(text), keep)


def fit(subject: Subject, ids: list[int], keep: str = "end") -> tuple[list[int], str]:
    """`ids` cut to the model's context (see `encode`), with the sentence that says what was cut."""
    if not ids:
        raise microscope.MicroscopeError("The text encodes to no tokens: type a few words.")
    ctx = subject.context_length
    if len(ids) <= ctx:
        return ids, ""
    cut = len(ids) - ctx
    said = f"The text has {len(ids)} tokens but the model sees {ctx} at once: "
    if keep == "end":
        return ids[-ctx:], said + f"the first {cut} tokens were cut."
    return ids[:ctx], said + f"the last {cut} tokens were cut."


# ---------------------------------------------------------------------------- the stage


@dataclass
class Settings:
    run: str = option("", metavar="RUN", help="a run holding a language model (pretrain, instruct, import)")
    prompt: str = option("", help="the text to continue")
    max_new_tokens: int = option(20, help="tokens to generate (default 20)")
    temperature: float = option(1.0, help="0 = greedy (always the top token); <1 sharper, >1 flatter")
    top_k: int | None = option(None, help="keep only the k most likely tokens")
    top_p: float | None = option(None, help="keep the smallest set whose probability reaches p (0 < p <= 1)")
    seed: int = option(0, help="seed of the sampler")
    template: str = option("auto", choices=TEMPLATES,
                           help="prompt template: auto (instruct runs: alpaca; chat imports: chatml), none, ...")
    force: tuple = option((), metavar="ID,ID", help="token ids to take instead of sampling, in order (a branch)")
    show: int = option(10, help="candidates listed per step (default 10)")

    def __post_init__(self):
        check_sampling(self.temperature, self.top_k, self.top_p)
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise microscope.MicroscopeError(
                f"max-new-tokens must be between 1 and {MAX_NEW_TOKENS}, got {self.max_new_tokens}.")
        if self.show < 1:
            raise microscope.MicroscopeError(f"show must be at least 1, got {self.show}.")
        try:
            self.force = tuple(int(i) for i in self.force)
        except (TypeError, ValueError):
            raise microscope.MicroscopeError("--force takes token ids: whole numbers separated by commas.") from None


def step_record(subject: Subject, step: microscope.Step, show: int) -> dict:
    top = [{"token": subject.label(c["id"]), **c} for c in step.top(show)]
    return {"token": subject.label(step.token_id), "token_id": step.token_id, "position": step.position,
            "rank": step.rank, "entropy": round(step.entropy, 4), "forced": step.forced,
            "top": top, "kept_size": int((step.kept > 0).sum())}


def explore(subject: Subject, settings: Settings) -> dict:
    """Run the step-by-step generator on a loaded run (the CLI and the page share this)."""
    template = default_template_for(subject, settings.template)
    ids, note = encode(subject, wrap_prompt(settings.prompt, template), keep="end")
    bad = [i for i in settings.force if not 0 <= i < subject.model.config.vocab_size]
    if bad:
        raise microscope.MicroscopeError(f"Token id {bad[0]} is not in this model's vocabulary "
                                         f"(0–{subject.model.config.vocab_size - 1}).")
    generator = torch.Generator().manual_seed(settings.seed)
    with models.generation_threads(subject.model):
        gen = microscope.generate_steps(
            subject.model, ids, settings.max_new_tokens, settings.temperature, settings.top_k,
            settings.top_p, forced=list(settings.force), generator=generator,
            stop_ids=stop_ids(subject, template))
    new_ids = gen.ids[len(ids):]
    return {
        "run_id": subject.run_id, "template": template, "note": note,
        "prompt_tokens": [subject.label(i) for i in ids], "prompt_ids": ids,
        "text": subject.tokenizer.decode(gen.ids), "completion": subject.tokenizer.decode(new_ids),
        "steps": [step_record(subject, s, settings.show) for s in gen.steps],
        "seconds_per_step": round(gen.seconds_per_step, 5),
        "kv_cache_tokens": gen.cache.length if gen.cache is not None else 0,
        "kv_cache_bytes": microscope.kv_cache_bytes(gen.cache) if gen.cache is not None else 0,
    }


def kv_timing(subject: Subject, ids: list[int], n_tokens: int = 8) -> dict:
    """Seconds per new token with and without the KV cache, continuing `ids` greedily."""
    ids = ids[-subject.context_length:]
    n_tokens = max(1, min(n_tokens, subject.context_length - len(ids)))  # the cache needs room
    with models.generation_threads(subject.model):
        cached = microscope.seconds_per_token(subject.model, ids, n_tokens, use_cache=True)
        plain = microscope.seconds_per_token(subject.model, ids, n_tokens, use_cache=False)
    return {"tokens": n_tokens, "with_cache_s": cached, "without_cache_s": plain, "speedup": plain / cached}


def default_template_for(subject: Subject, template: str) -> str:
    return subject.template if template == "auto" else template


def run(settings: Settings, progress=None) -> dict:
    result = explore(open_subject(settings.run), settings)
    if progress is not None:
        for step in result["steps"]:
            progress(step)
    return result


def print_progress(step: dict) -> None:
    print(f"{step['position']:>5} {step['token']!r:<16} rank {step['rank']:>5}  "
          f"entropy {step['entropy']:.2f} bits{'  (forced)' if step['forced'] else ''}",
          file=sys.stderr, flush=True)


CODE = {
    "distributions": (microscope.three_distributions, filtered_probabilities, microscope.entropy_bits,
                      microscope.rank_of),
    "generate": (microscope.generate_steps, microscope.choose_token),
    "kv_cache": (next_logits, microscope.kv_cache_bytes, microscope.seconds_per_token),
}
