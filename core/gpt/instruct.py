"""Stage 6 — instruction fine-tuning: from "continues the text" to "answers the instruction".

A pre-trained model only knows how to continue text. Here we show it ~900 examples of one fixed
format (the Alpaca template of the reference book's chapter 7):

    Below is an instruction that describes a task. Write a response that appropriately completes the request.

    ### Instruction:
    Rewrite the sentence using a simile.

    ### Input:
    The car is very fast.

    ### Response:
    The car is as fast as lightning.<|endoftext|>

and train it with the same next-token loss as in stage 4. What the learner sees on the page:

- the data: records `{instruction, input, output}`, the template, an 85 / 10 / 5 train / test / val split;
- the batches: padded with the end-of-text token, padding left out of the loss (ignore index -100),
  and, with a switch, the prompt left out of the loss as well;
- the effect: for the test instructions, the response of the starting model next to the response
  of the tuned model, and a **format-following rate** — the share of answers that are non-empty,
  end with end-of-text before the token budget runs out, and do not echo the template.

Reading the data file and writing the run (`responses.json`, one record per test instruction
with both models' answers, and `format_rates.json`, which stage 7's judge reads) is the stage's
job: `core/stages/instruct.py`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from core.gpt.dataset import epoch_batch
from core.gpt.errors import DataError, GlassBoxError, TokenizerError, TrainingError
from core.gpt.train import TrainTask

# ---------------------------------------------------------------------------------------------
# 1. The data and the prompt template
# ---------------------------------------------------------------------------------------------

IGNORE_INDEX = -100  # targets with this value add nothing to the cross-entropy loss
REQUIRED_FIELDS = ("instruction", "input", "output")

PROMPT_INTRO = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
RESPONSE_MARKER = "### Response:"
END_OF_TEXT = "<|endoftext|>"
# Text that only appears in an answer when the model echoes the template instead of answering.
TEMPLATE_ECHOES = ("### Instruction", "### Input", "### Response", "Below is an instruction")


def parse_instruction_records(text: str, origin: str = "the instruction data") -> list[dict]:
    """Parse and check a JSON list of `{instruction, input, output}` records.

    Every record must be an object whose three fields are strings and whose instruction and output
    are not blank; the error names the first record that is not.
    """
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{origin} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})."
        ) from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{origin} must be a non-empty JSON list of records.")
    cleaned = []
    for number, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"Record {number} of {origin} is not a JSON object: {str(record)[:60]!r}.")
        missing = [name for name in REQUIRED_FIELDS if name not in record]
        if missing:
            raise DataError(
                f"Record {number} of {origin} is missing the field(s) {', '.join(missing)} "
                f"(every record needs instruction, input and output)."
            )
        wrong = [name for name in REQUIRED_FIELDS if not isinstance(record[name], str)]
        if wrong:
            raise DataError(f"Record {number} of {origin}: field(s) {', '.join(wrong)} must be text.")
        if not record["instruction"].strip() or not record["output"].strip():
            raise DataError(f"Record {number} of {origin} has an empty instruction or output.")
        cleaned.append({name: record[name] for name in REQUIRED_FIELDS})
    return cleaned


def format_prompt(entry: dict) -> str:
    """The Alpaca-style prompt, ending right where the model's answer should begin."""
    prompt = f"{PROMPT_INTRO}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):  # the input section is left out when there is no input
        prompt += f"\n\n### Input:\n{entry['input']}"
    return prompt + f"\n\n{RESPONSE_MARKER}\n"


def format_example(entry: dict) -> str:
    """Prompt + reference answer: the full text the model is trained on (before end-of-text)."""
    return format_prompt(entry) + entry["output"]


def split_records(
    records: list[dict], train_fraction: float = 0.85, test_fraction: float = 0.10,
    seed: int | None = None,
) -> dict[str, list[dict]]:
    """Split into train / test / val: 85% / 10% / the rest (5%).

    Like the book's chapter 7 the split is sequential by default (first 85% train, next 10% test,
    last 5% val), so with the book's 1,100 records the test set is records 935-1044, the same
    110 records as the book's `instruction-data-with-response.json`. Pass a `seed` to shuffle
    first (a fixed seed gives the same split every time).
    """
    records = list(records)
    if seed is not None:
        order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
        records = [records[i] for i in order]
    n_train = int(len(records) * train_fraction)
    n_test = int(len(records) * test_fraction)
    splits = {
        "train": records[:n_train],
        "test": records[n_train:n_train + n_test],
        "val": records[n_train + n_test:],
    }
    empty = [name for name, part in splits.items() if not part]
    if empty:
        raise DataError(
            f"Only {len(records)} instruction records: too few for a train / test / val split "
            f"(the {', '.join(empty)} part would be empty)."
        )
    return splits


# ---------------------------------------------------------------------------------------------
# 2. Token ids and batches
# ---------------------------------------------------------------------------------------------

@dataclass
class EncodedExample:
    """One training example as token ids: prompt, then answer, then end-of-text."""

    ids: list[int]
    prompt_length: int  # how many of `ids` belong to the prompt


def require_end_of_text(tokenizer) -> int:
    """The end-of-text id, or a clear error: instruction tuning needs a token that means "stop"."""
    eot_id = getattr(tokenizer, "eot_id", None)
    if eot_id is None:
        raise TokenizerError(
            f"This run's tokeniser ({getattr(tokenizer, 'kind', '?')}) has no end-of-text token "
            "<|endoftext|>, so the model could never learn where an answer stops. Start from a "
            "run with a BPE or GPT-2 tokeniser."
        )
    return int(eot_id)


def encode_example(tokenizer, entry: dict) -> EncodedExample:
    """Encode prompt and answer separately, so the prompt ids are exactly what we feed at
    generation time (a BPE could otherwise merge across the boundary)."""
    eot_id = require_end_of_text(tokenizer)
    prompt_ids = tokenizer.encode(format_prompt(entry))
    answer_ids = tokenizer.encode(entry["output"])
    return EncodedExample(ids=prompt_ids + answer_ids + [eot_id], prompt_length=len(prompt_ids))


def collate_instructions(
    examples: list[EncodedExample], pad_id: int, context_length: int | None = None,
    mask_prompt: bool = False, ignore_index: int = IGNORE_INDEX,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn examples of different lengths into one batch `(inputs, targets)`, each `(B, T)`.

    - every sequence is padded with the end-of-text token up to the longest one;
    - targets are the inputs shifted left by one (predict the next token);
    - the first end-of-text target stays (the model must learn to stop), every padding target
      after it becomes `ignore_index`, so padding adds nothing to the loss;
    - with `mask_prompt`, targets inside the prompt are ignored as well: the model is graded
      only on its answer;
    - sequences longer than `context_length` are cut to fit the model.
    """
    if not examples:
        raise TrainingError("An instruction batch needs at least one example.")
    longest = max(len(ex.ids) for ex in examples)  # each already ends with its end-of-text
    inputs, targets = [], []
    for ex in examples:
        padded = ex.ids + [pad_id] * (longest - len(ex.ids))
        x = torch.tensor(padded[:-1])   # (T,)
        y = torch.tensor(padded[1:])    # (T,) the next token at each position
        y[len(ex.ids) - 1:] = ignore_index   # targets beyond the first end-of-text: padding
        if mask_prompt:
            # position i predicts token i+1; tokens 1 .. prompt_length-1 belong to the prompt
            y[:ex.prompt_length - 1] = ignore_index
        inputs.append(x)
        targets.append(y)
    inputs = torch.stack(inputs)    # (B, T)
    targets = torch.stack(targets)  # (B, T)
    if context_length is not None:
        inputs, targets = inputs[:, :context_length], targets[:, :context_length]
    return inputs, targets


# ---------------------------------------------------------------------------------------------
# 3. Answers: extraction and the format-following rate
# ---------------------------------------------------------------------------------------------

def extract_response(text: str) -> str:
    """The answer inside a generated text: after "### Response:", up to end-of-text, stripped.

    Works on a full generation (prompt included) or on the new text alone.
    """
    if RESPONSE_MARKER in text:
        text = text.split(RESPONSE_MARKER, 1)[1]
    text = text.split(END_OF_TEXT, 1)[0]
    return text.strip()


def format_problems(response: str, stopped: bool) -> list[str]:
    """Why an answer does not follow the format (empty list = it does).

    The three rules: the answer is not empty; the model ended it with end-of-text before the token
    budget ran out (it knows where an answer stops); it does not echo the prompt template.
    """
    problems = []
    if not response.strip():
        problems.append("empty")
    if not stopped:
        problems.append("no end-of-text before the token budget")
    echoed = [marker for marker in TEMPLATE_ECHOES if marker.lower() in response.lower()]
    if echoed:
        problems.append(f"echoes the template ({echoed[0]!r})")
    return problems


def follows_format(response: str, stopped: bool) -> bool:
    return not format_problems(response, stopped)


def format_rate(flags: list[bool]) -> float:
    """Share of answers (0-1) that follow the format."""
    return sum(bool(f) for f in flags) / len(flags) if flags else 0.0


@dataclass
class Answer:
    text: str          # the extracted answer
    stopped: bool      # ended with end-of-text before max_new_tokens
    new_tokens: int
    problems: list[str] = field(default_factory=list)

    @property
    def follows_format(self) -> bool:
        return not self.problems


def _generate_ids(model, prompt_ids: list[int], max_new_tokens: int, eot_id: int,
                  temperature: float, top_k: int | None, top_p: float | None) -> list[int]:
    """New token ids after the prompt (greedy when temperature is 0), ending at end-of-text."""
    context_length = model.config.context_length
    # keep room for the answer: the prompt's start is dropped if prompt + answer would not fit
    keep = max(1, context_length - max_new_tokens)
    prompt_ids = prompt_ids[-keep:] if len(prompt_ids) > keep else prompt_ids
    device = next(model.parameters()).device
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # (1, T)
    # temperature 0 is greedy decoding; the KV cache makes each new token cost one position
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k,
                         top_p=top_p, eos_id=eot_id, use_cache=True)  # (1, T + new)
    new_ids = out[0, idx.shape[1]:].tolist()
    if eot_id in new_ids:
        new_ids = new_ids[:new_ids.index(eot_id) + 1]
    return new_ids


def generate_answer(model, tokenizer, entry: dict, max_new_tokens: int = 128,
                    temperature: float = 0.0, top_k: int | None = None,
                    top_p: float | None = None) -> Answer:
    """Prompt the model with one record and return its answer (greedy by default)."""
    if not entry.get("instruction", "").strip():
        raise GlassBoxError("Type an instruction first: the model needs something to answer.")
    if max_new_tokens < 1:
        raise GlassBoxError("The token budget (max tokens) must be at least 1.")
    eot_id = require_end_of_text(tokenizer)
    was_training = model.training
    model.eval()
    try:
        new_ids = _generate_ids(model, tokenizer.encode(format_prompt(entry)),
                                max_new_tokens, eot_id, temperature, top_k, top_p)
    finally:
        model.train(was_training)
    stopped = bool(new_ids) and new_ids[-1] == eot_id
    text_ids = new_ids[:-1] if stopped else new_ids
    # the new text is the answer itself (no split at "### Response:", so an echo stays visible)
    text = tokenizer.decode(text_ids).strip()
    return Answer(text=text, stopped=stopped, new_tokens=len(new_ids),
                  problems=format_problems(text, stopped))


# ---------------------------------------------------------------------------------------------
# 4. The training task for the shared loop (core/gpt/train.py)
# ---------------------------------------------------------------------------------------------

class InstructionTask(TrainTask):
    """What stage 6 changes in the shared loop: the batches (template + collate) and the samples.

    Batches are a function of the step alone (`core.gpt.dataset.epoch_batch`): each pass over the
    training set has its own shuffled order, and step `s` takes the next `batch_size` examples of
    it. So a resumed run sees exactly the batches it would have seen without the interruption.
    """

    def __init__(self, tokenizer, splits: dict[str, list[dict]], context_length: int,
                 mask_prompt: bool = False, seed: int = 1337, eval_batch_size: int = 8,
                 sample_tokens: int = 64):
        self.tokenizer = tokenizer
        self.eot_id = require_end_of_text(tokenizer)
        self.splits = splits
        self.encoded = {name: [encode_example(tokenizer, r) for r in part]
                        for name, part in splits.items()}
        self.context_length = context_length
        self.mask_prompt = mask_prompt
        self.seed = seed
        self.eval_batch_size = eval_batch_size
        self.sample_tokens = sample_tokens
        # a fixed validation instruction, answered at every sample step: the page shows it change
        self.sample_entry = splits["val"][0]

    def collate(self, examples: list[EncodedExample]) -> tuple[torch.Tensor, torch.Tensor]:
        return collate_instructions(examples, pad_id=self.eot_id,
                                    context_length=self.context_length,
                                    mask_prompt=self.mask_prompt)

    def get_batch(self, split, step, batch_size, generator=None):
        """Batch `step`: the next `batch_size` examples of this pass's shuffled order."""
        examples = self.encoded[split]
        picked = [examples[i] for i in epoch_batch(len(examples), step, batch_size, self.seed)]
        return self.collate(picked)  # (B, T), (B, T)

    def loss(self, model, inputs, targets):
        _, loss = model(inputs, targets, ignore_index=IGNORE_INDEX)
        return loss

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Mean loss over the whole validation split (graded tokens only)."""
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        total, count = 0.0, 0
        examples = self.encoded["val"]
        for start in range(0, len(examples), self.eval_batch_size):
            inputs, targets = self.collate(examples[start:start + self.eval_batch_size])
            inputs, targets = inputs.to(device), targets.to(device)
            graded = int((targets != IGNORE_INDEX).sum())
            if graded == 0:
                continue
            total += float(self.loss(model, inputs, targets)) * graded
            count += graded
        model.train(was_training)
        return {"val_loss": total / count if count else float("nan")}

    def sample(self, model) -> str | None:
        answer = generate_answer(model, self.tokenizer, self.sample_entry,
                                 max_new_tokens=self.sample_tokens)
        return answer.text + ("" if answer.stopped else " …")

    def tokens_in_batch(self, inputs) -> int:
        return int(inputs.numel())


# ---------------------------------------------------------------------------------------------
# 5. Side by side: both models' answers to the same instructions
# ---------------------------------------------------------------------------------------------

def answer_all(model, tokenizer, records: list[dict], max_new_tokens: int,
               progress=None, label: str = "model") -> list[Answer]:
    """Greedy answers (KV cache) of one model to every record."""
    answers = []
    for number, record in enumerate(records, 1):
        answers.append(generate_answer(model, tokenizer, record, max_new_tokens=max_new_tokens))
        if progress and (number % 10 == 0 or number == len(records)):
            progress(f"{label}: answered {number}/{len(records)} test instructions")
    return answers


def answer_to_dict(answer: Answer) -> dict:
    return {"text": answer.text, "stopped": answer.stopped, "new_tokens": answer.new_tokens,
            "problems": answer.problems}


def answer_from_dict(d: dict) -> Answer:
    return Answer(text=d["text"], stopped=d["stopped"], new_tokens=d["new_tokens"],
                  problems=list(d["problems"]))


def side_by_side(records: list[dict], base: list[Answer], tuned: list[Answer]) -> list[dict]:
    """The records of `responses.json`: instruction, input, reference output, both answers."""
    return [
        {
            "instruction": r["instruction"], "input": r["input"], "output": r["output"],
            "base_response": b.text, "tuned_response": t.text,
            "base_follows_format": b.follows_format, "tuned_follows_format": t.follows_format,
            "base_problems": b.problems, "tuned_problems": t.problems,
            "base_new_tokens": b.new_tokens, "tuned_new_tokens": t.new_tokens,
        }
        for r, b, t in zip(records, base, tuned)
    ]


def answer_both(base_model, tuned_model, tokenizer, entry: dict, max_new_tokens: int = 96,
                temperature: float = 0.0, top_k: int | None = None) -> dict[str, Answer]:
    """One instruction answered by the starting and the tuned model, with the same settings."""
    entry = {"instruction": entry.get("instruction", ""), "input": entry.get("input", "") or "",
             "output": entry.get("output", "")}
    return {name: generate_answer(model, tokenizer, entry, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_k=top_k)
            for name, model in (("base", base_model), ("tuned", tuned_model))}


def suggested_lr(n_embd: int) -> float:
    """A peak learning rate that suits the starting model's width.

    Small models trained here from scratch take the rate they were pre-trained with (1e-3);
    GPT-2-sized models forget what they know at that rate, so they get the book's 5e-5.
    """
    return 5e-5 if n_embd >= 576 else 1e-3
