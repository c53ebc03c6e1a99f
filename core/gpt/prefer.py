"""Preference tuning with DPO: teach an instruction-tuned model which of two answers people prefer.

Stage 6 showed the model one good answer per instruction. Preference data shows it two: a
`chosen` answer (here: polite) and a `rejected` one (rude or unhelpful) to the same prompt.
Direct Preference Optimisation (Rafailov et al., 2023) turns such pairs into a loss, with no
reward model and no reinforcement learning:

    log-prob of an answer  = sum of log p(token) over the answer's tokens (the prompt is not scored)
    implicit reward r(y)   = β · (log π(y | x) − log π_ref(y | x))      π: the model being tuned
                                                                         π_ref: a frozen copy of it
    loss                   = −log σ(r(chosen) − r(rejected))

The reward says how much more likely the tuned model finds an answer than the reference does; the
loss pushes the chosen answer's reward above the rejected one's. β sets how far the model may move
from the reference: small β, large moves. At step 0 the model *is* the reference, so both rewards
are 0 and the loss is −log σ(0) = ln 2 ≈ 0.693.

What the page plots, on held-out pairs: the loss, the reward margin r(chosen) − r(rejected), the
reward accuracy (the share of pairs whose margin is above 0), and the chosen and rejected
log-probabilities, so you can see whether DPO raises "chosen" or only pushes "rejected" down.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from core.gpt.dataset import epoch_batch
from core.gpt.errors import GlassBoxError
from core.gpt.instruct import IGNORE_INDEX, format_prompt, require_end_of_text
from core.gpt.lora import lora_disabled, lora_layers
from core.gpt.train import TrainTask

PAIR_FIELDS = ("instruction", "chosen", "rejected")


class PreferenceError(GlassBoxError):
    """Preference data or DPO settings that cannot work."""


# ---------------------------------------------------------------------------- 1. the data


def parse_preference_records(text: str, origin: str = "the preference data") -> tuple[list[dict], list[int]]:
    """JSON records `{instruction, input, chosen, rejected}` → (usable records, numbers of skipped ones).

    A record whose chosen and rejected answers are identical teaches DPO nothing (its margin is 0
    whatever the model does): it is skipped, and its number returned so the learner is told.
    """
    try:
        records = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PreferenceError(f"{origin} is not valid JSON (line {exc.lineno}: {exc.msg}).") from None
    if not isinstance(records, list) or not records:
        raise PreferenceError(f"{origin} must be a non-empty JSON list of records.")
    kept, identical = [], []
    for number, record in enumerate(records):
        if not isinstance(record, dict):
            raise PreferenceError(f"Record {number} of {origin} is not a JSON object.")
        missing = [name for name in PAIR_FIELDS if not isinstance(record.get(name), str) or not record[name].strip()]
        if missing:
            raise PreferenceError(
                f"Record {number} of {origin} has no {' and no '.join(missing)} text: every preference "
                "record needs an instruction, a chosen and a rejected answer."
            )
        if record["chosen"].strip() == record["rejected"].strip():
            identical.append(number)
            continue
        kept.append({"instruction": record["instruction"], "input": record.get("input") or "",
                     "output": record.get("output") or record["chosen"],
                     "chosen": record["chosen"], "rejected": record["rejected"]})
    if not kept:
        raise PreferenceError(
            f"In all {len(records)} records of {origin} the chosen and the rejected answer are "
            "identical: DPO learns from the difference between them, so there is nothing to learn."
        )
    return kept, identical


@dataclass
class EncodedPair:
    chosen: list[int]    # prompt + chosen answer + end-of-text
    rejected: list[int]  # prompt + rejected answer + end-of-text
    prompt_length: int


def encode_pair(tokenizer, entry: dict, prompt_format=format_prompt, end_id: int | None = None) -> EncodedPair:
    """Token ids of both answers after the same prompt (the prompt encoded once, on its own).
    Each answer ends with `end_id`: end-of-text, or the chat template's end of turn."""
    eot_id = require_end_of_text(tokenizer) if end_id is None else end_id
    prompt = tokenizer.encode(prompt_format(entry))
    return EncodedPair(chosen=prompt + tokenizer.encode(entry["chosen"]) + [eot_id],
                       rejected=prompt + tokenizer.encode(entry["rejected"]) + [eot_id],
                       prompt_length=len(prompt))


def collate_pairs(pairs: list[EncodedPair], pad_id: int, context_length: int | None = None):
    """A batch of pairs as `(inputs, targets)`, each (B, 2, T): [:, 0] chosen, [:, 1] rejected.

    Targets are the next tokens of the answer only: prompt and padding are IGNORE_INDEX, so
    they add nothing to an answer's log-probability.
    """
    if not pairs:
        raise PreferenceError("A preference batch needs at least one pair.")
    longest = max(len(ids) for p in pairs for ids in (p.chosen, p.rejected))
    inputs, targets = [], []
    for p in pairs:
        for ids in (p.chosen, p.rejected):
            padded = ids + [pad_id] * (longest - len(ids))
            x, y = torch.tensor(padded[:-1]), torch.tensor(padded[1:])  # (T,), (T,)
            y[: p.prompt_length - 1] = IGNORE_INDEX  # the prompt's own tokens are not scored
            y[len(ids) - 1:] = IGNORE_INDEX          # nor is the padding after end-of-text
            inputs.append(x)
            targets.append(y)
    T = longest - 1 if context_length is None else min(longest - 1, context_length)
    shape = (len(pairs), 2, longest - 1)
    return torch.stack(inputs).view(shape)[..., :T], torch.stack(targets).view(shape)[..., :T]


# ---------------------------------------------------------------------------- 2. the loss


def sequence_logprobs(model, inputs, targets):
    """log π(answer | prompt) for each row: the sum of the scored tokens' log-probabilities.

    inputs, targets (N, T) → (N,). Unscored targets (IGNORE_INDEX) contribute 0.
    """
    logits, _ = model(inputs)  # (N, T, V)
    token_logp = -F.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                  ignore_index=IGNORE_INDEX, reduction="none")  # (N*T,)
    return token_logp.view(targets.shape).sum(dim=-1)  # (N,)


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float = 0.1) -> dict:
    """The DPO loss and the implicit rewards, from four log-probabilities per pair (each (B,))."""
    chosen_rewards = beta * (policy_chosen - ref_chosen)        # (B,)
    rejected_rewards = beta * (policy_rejected - ref_rejected)  # (B,)
    margins = chosen_rewards - rejected_rewards                 # (B,)
    loss = -F.logsigmoid(margins).mean()                        # ln 2 when the margins are 0
    return {"loss": loss, "margins": margins,
            "chosen_rewards": chosen_rewards, "rejected_rewards": rejected_rewards}


def check_beta(beta) -> float:
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise PreferenceError(f"β must be a positive number (got {beta!r}); the DPO paper uses 0.1.")
    return float(beta)


def reference_logprobs(model, reference, inputs, targets):
    """log π_ref: the frozen reference model, or — for a LoRA model — the same model with its
    adapters switched off (no second copy of the weights is needed)."""
    with torch.no_grad():
        if reference is not None:
            return sequence_logprobs(reference, inputs, targets)
        with lora_disabled(model):
            return sequence_logprobs(model, inputs, targets)


def pair_statistics(out: dict, policy_chosen, policy_rejected) -> dict[str, float]:
    """What the page plots for a set of pairs (means over the pairs)."""
    return {"reward_margin": float(out["margins"].mean()),
            "reward_accuracy": float((out["margins"] > 0).float().mean()),
            "chosen_reward": float(out["chosen_rewards"].mean()),
            "rejected_reward": float(out["rejected_rewards"].mean()),
            "chosen_logp": float(policy_chosen.mean()),
            "rejected_logp": float(policy_rejected.mean())}


# ---------------------------------------------------------------------------- 3. the training task


class DPOTask(TrainTask):
    """DPO in the shared training loop: batches of pairs, the DPO loss, held-out pair statistics.

    `reference` is a frozen model; None means "the policy with its LoRA adapters off". Batches are
    a function of the step alone (`epoch_batch`), so a resumed run sees exactly the same pairs.
    """

    def __init__(self, tokenizer, splits: dict[str, list[dict]], context_length: int,
                 beta: float = 0.1, reference=None, seed: int = 1337, eval_pairs: int | None = None,
                 eval_batch_size: int = 4, prompt_format=format_prompt, end_id: int | None = None):
        self.beta = check_beta(beta)
        self.tokenizer, self.reference, self.seed = tokenizer, reference, seed
        self.pad_id = require_end_of_text(tokenizer)
        self.context_length, self.eval_batch_size = context_length, eval_batch_size
        val = splits["val"][:eval_pairs] if eval_pairs else splits["val"]
        self.encoded = {name: [encode_pair(tokenizer, r, prompt_format, end_id) for r in part]
                        for name, part in (("train", splits["train"]), ("val", val))}
        self.val_reference: list[torch.Tensor] | None = None  # computed once: the reference never changes

    def prepare(self, config, device) -> None:
        super().prepare(config, device)
        if self.reference is not None:
            self.reference.to(device)  # the loop moves the policy; the reference goes with it

    def check_reference(self, model) -> None:
        if self.reference is None and not lora_layers(model):
            raise PreferenceError("DPO needs a frozen reference model (or a LoRA model whose adapters can be switched off).")

    def collate(self, pairs):
        return collate_pairs(pairs, self.pad_id, self.context_length)

    def get_batch(self, split, step, batch_size, generator=None):
        pairs = self.encoded[split]
        return self.collate([pairs[i] for i in epoch_batch(len(pairs), step, batch_size, self.seed)])

    def pair_loss(self, model, inputs, targets, ref=None):
        """inputs, targets (B, 2, T) → (DPO outputs, policy log-probs (B, 2), reference log-probs (B, 2))."""
        B = inputs.shape[0]
        flat_x, flat_y = inputs.reshape(2 * B, -1), targets.reshape(2 * B, -1)  # chosen, rejected, ...
        policy = sequence_logprobs(model, flat_x, flat_y).view(B, 2)
        if ref is None:
            ref = reference_logprobs(model, self.reference, flat_x, flat_y).view(B, 2)
        return dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.beta), policy, ref

    def loss(self, model, inputs, targets):
        self.check_reference(model)
        return self.pair_loss(model, inputs, targets)[0]["loss"]

    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """val_loss and the pair statistics over the held-out pairs."""
        self.check_reference(model)
        device = next(model.parameters()).device
        pairs, n = self.encoded["val"], self.eval_batch_size
        cached = self.val_reference is not None
        policies, refs = [], []
        for i, start in enumerate(range(0, len(pairs), n)):
            x, y = (t.to(device) for t in self.collate(pairs[start:start + n]))
            _, policy, ref = self.pair_loss(model, x, y, self.val_reference[i].to(device) if cached else None)
            policies.append(policy)
            refs.append(ref)
        self.val_reference = refs
        policy, ref = torch.cat(policies), torch.cat(refs)  # (N, 2) each
        out = dpo_loss(policy[:, 0], policy[:, 1], ref[:, 0], ref[:, 1], self.beta)
        return {"val_loss": float(out["loss"]), **pair_statistics(out, policy[:, 0], policy[:, 1])}

    def tokens_in_batch(self, inputs) -> int:
        return int(inputs.numel())


@torch.no_grad()
def answer(model, tokenizer, entry: dict, prompt_format=format_prompt, end_id: int | None = None,
           max_new_tokens: int = 64) -> tuple[str, bool]:
    """A greedy answer to one record: (text, stopped at `end_id` before the token budget ran out)."""
    end_id = require_end_of_text(tokenizer) if end_id is None else end_id
    keep = max(1, model.config.context_length - max_new_tokens)  # room for the answer
    prompt = tokenizer.encode(prompt_format(entry))[-keep:]
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([prompt], device=device), max_new_tokens, temperature=0.0, eos_id=end_id)
    new = out[0, len(prompt):].tolist()
    stopped = end_id in new
    return tokenizer.decode(new[:new.index(end_id)] if stopped else new).strip(), stopped


def reference_copy(model):
    """A frozen copy of `model` to serve as the DPO reference (full fine-tuning)."""
    reference = copy.deepcopy(model).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    return reference
