"""Is my run healthy? Plain checks on a loss curve, and one batch computed twice to trust a device.

A learner's first curve raises questions a teacher answers at a glance: is it falling as it
should? Each check below is a small pure function over the metrics rows a run logs (`step`,
`train_loss`, `val_loss`, `lr`) and says, in a sentence, what it sees and what to try:

- diverging: the loss turned NaN, or climbed well back up from its best;
- too high a learning rate: the loss jumps up and down from one point to the next;
- a plateau: it has stopped falling, far above where the reference run was at that step;
- overfitting: the validation loss rises while the training loss still falls (memorising);
- off the band: behind the reference curve of the same preset and recipe, measured here.

`device_check` answers another question: does this GPU (or Apple's MPS) compute what the CPU
computes? One batch, one loss, on both: they must agree to 1e-3.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from core.gpt.errors import GlassBoxError


@dataclass
class Message:
    kind: str  # diverging | lr_too_high | plateau | overfitting | off_band
    text: str


def smooth(values: list[float], width: int = 5) -> list[float]:
    """A trailing moving average: one noisy point does not decide anything."""
    out = []
    for i in range(len(values)):
        window = values[max(0, i - width + 1):i + 1]
        out.append(sum(window) / len(window))
    return out


def series(metrics: list[dict], key: str) -> tuple[list[int], list[float]]:
    rows = [m for m in metrics if m.get(key) is not None]
    return [int(m["step"]) for m in rows], [float(m[key]) for m in rows]


def diverging(metrics: list[dict]) -> Message | None:
    """A NaN loss, or the recent training loss far above its best (and above where it started)."""
    _, losses = series(metrics, "train_loss")
    if any(not math.isfinite(v) for v in losses):
        return Message("diverging", "The loss became NaN or infinite: training diverged. Lower the learning "
                                    "rate (try half) and start again.")
    if len(losses) < 10:
        return None
    s = smooth(losses)
    best, now = min(s), s[-1]
    if now > best + max(0.5, 0.25 * best) and now > 0.8 * s[0]:
        return Message("diverging", f"The loss climbed from its best {best:.2f} back up to {now:.2f}: the run "
                                    "is diverging. Lower the learning rate, or resume from an earlier step.")
    return None


def lr_too_high(metrics: list[dict]) -> Message | None:
    """Many jumps up between consecutive points: the steps overshoot the valley they are in."""
    _, losses = series(metrics, "train_loss")
    recent = [v for v in losses[len(losses) // 4:] if math.isfinite(v)]  # after the first quarter
    if len(recent) < 12:
        return None
    jumps = sum(1 for a, b in zip(recent, recent[1:]) if b > a * 1.10)
    if jumps / (len(recent) - 1) > 0.2:
        return Message("lr_too_high", f"The loss jumps up by more than 10 % at {jumps} of the last "
                                      f"{len(recent) - 1} points: the learning rate looks too high. Try a lower "
                                      "peak (a third) or a longer warm-up.")
    return None


def overfitting(metrics: list[dict], rise: float = 0.05) -> Message | None:
    """Validation loss rising from its best while the training loss keeps falling."""
    val_steps, vals = series(metrics, "val_loss")
    if len(vals) < 3:
        return None
    best_i = min(range(len(vals)), key=vals.__getitem__)
    if vals[-1] < vals[best_i] + max(rise, 0.03 * vals[best_i]) or best_i == len(vals) - 1:
        return None
    train_at = dict(zip(*series(metrics, "train_loss")))
    before = [train_at[s] for s in train_at if s <= val_steps[best_i]]
    after = [train_at[s] for s in train_at if s > val_steps[best_i]]
    if before and after and min(after) < before[-1]:
        return Message("overfitting", f"The validation loss rose from {vals[best_i]:.3f} (step {val_steps[best_i]}) "
                                      f"to {vals[-1]:.3f} while the training loss kept falling: the model is "
                                      "memorising its training text. Keep the weights of the best step, use more "
                                      "data, or train for fewer steps.")
    return None


def reference_at(reference: dict, key: str, step: int) -> float | None:
    """The reference curve's value at `step`, linearly interpolated (None outside it)."""
    points = [(s, v) for s, v in zip(reference["step"], reference.get(key) or []) if v is not None]
    for (s0, v0), (s1, v1) in zip(points, points[1:]):
        if s0 <= step <= s1:
            return v0 + (v1 - v0) * (step - s0) / max(1, s1 - s0)
    return None


def plateau(metrics: list[dict], reference: dict | None) -> Message | None:
    """The last third of the points improved by under 1 %, while well above the reference at that step."""
    steps, losses = series(metrics, "train_loss")
    if len(losses) < 15 or not reference:
        return None
    s = smooth(losses)
    third = len(s) // 3
    improvement = (s[-third - 1] - s[-1]) / max(1e-9, s[-third - 1])
    expected = reference_at(reference, "train_loss", steps[-1])
    if improvement < 0.01 and expected is not None and s[-1] > expected * (1 + reference.get("band", 0.1)):
        return Message("plateau", f"The loss has stopped falling at {s[-1]:.2f}, where the reference run was "
                                  f"already at {expected:.2f}. A higher learning rate, a shorter context or denser "
                                  "tokens (our BPE) usually get it moving.")
    return None


def off_band(metrics: list[dict], reference: dict | None) -> Message | None:
    """The latest validation loss above the reference band at the same step."""
    steps, vals = series(metrics, "val_loss")
    if not vals or not reference:
        return None
    expected = reference_at(reference, "val_loss", steps[-1])
    band = reference.get("band", 0.1)
    if expected is not None and vals[-1] > expected * (1 + band):
        return Message("off_band", f"At step {steps[-1]} the validation loss is {vals[-1]:.3f}; the reference run "
                                   f"of this preset and recipe was at {expected:.3f} (band ±{band:.0%}).")
    return None


def health_messages(metrics: list[dict], reference: dict | None = None) -> list[Message]:
    """Every check that has something to say about this curve (none: it looks healthy)."""
    found = [diverging(metrics), lr_too_high(metrics), overfitting(metrics)]
    if not found[0]:
        found += [plateau(metrics, reference), off_band(metrics, reference)]
    return [m for m in found if m is not None]


# ---------------------------------------------------------------------------- device check


class DeviceMismatch(GlassBoxError):
    """The device computes another loss than the CPU for the same batch."""


def batch_loss(model, inputs, targets, device) -> float:
    """The loss of one batch in plain fp32 on `device` (no dropout, no autocast, no TF32)."""
    model = model.to(device).eval()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        with torch.no_grad():
            _, loss = model(inputs.to(device), targets.to(device))
        return float(loss.float().item())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def device_check(model, inputs, targets, device, tolerance: float = 1e-3, alter=None) -> dict:
    """The same batch through copies of `model` on the CPU and on `device`: do the losses agree?

    `alter(model)` changes the device copy before the check (a test perturbs the computation).
    Returns cpu_loss, device_loss, difference, tolerance, ok.
    """
    cpu_loss = batch_loss(copy.deepcopy(model).cpu(), inputs, targets, torch.device("cpu"))
    on_device = copy.deepcopy(model).cpu()
    if alter is not None:
        alter(on_device)
    device_loss = batch_loss(on_device, inputs, targets, torch.device(device))
    difference = abs(cpu_loss - device_loss) if math.isfinite(device_loss) else float("inf")
    return {"device": str(device), "cpu_loss": cpu_loss, "device_loss": device_loss,
            "difference": difference, "tolerance": tolerance, "ok": difference <= tolerance}


def device_message(check: dict) -> str | None:
    """What to tell the learner when the device disagrees with the CPU (None: it agrees)."""
    if check["ok"]:
        return None
    return (f"On {check['device']} this model computes a loss of {check['device_loss']:.4f} for a batch where the "
            f"CPU computes {check['cpu_loss']:.4f} (difference {check['difference']:.2e}, allowed "
            f"{check['tolerance']:.0e}): this device computes something else. Train on the CPU "
            "(--device cpu), or update PyTorch.")


# ---------------------------------------------------------------------------- expected vs yours

# Reference curves: `python -m core pretrain --data tinyshakespeare --tokenizer char --preset P` with the
# preset's recipe (core/gpt/pretrain.py), measured here. CPU fp32 training is deterministic for a
# seed, so the curve against steps is the machine's only through its speed (`seconds`).
REFERENCES: dict[str, dict] = {
    "tiny": {
        "data": "tinyshakespeare", "tokenizer": "char", "band": 0.1,
        "recipe": {"max_steps": 300, "batch_size": 32, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 20},
        "machine": "this project's 2-core x86 CPU, torch 2.13 fp32, shared by ~9 sessions (load ~15): "
                   "1,722 s for what takes ~30 s on a quiet machine (2026-12-01, --eval-every 25)",
        "step": [1, 10, 20, 25, 30, 40, 50, 60, 70, 75, 80, 90, 100, 110, 120, 125, 130, 140, 150, 160, 170, 175,
                 180, 190, 200, 210, 220, 225, 230, 240, 250, 260, 270, 275, 280, 290, 300],
        "train_loss": [4.2224, 3.9311, 3.419, 3.0549, 2.8925, 2.7655, 2.6568, 2.6032, 2.5526, 2.5516, 2.5339,
                       2.5347, 2.5136, 2.4944, 2.4789, 2.4659, 2.484, 2.461, 2.457, 2.4395, 2.4228, 2.4436, 2.4135,
                       2.4035, 2.4232, 2.3902, 2.3787, 2.3693, 2.3821, 2.3636, 2.3738, 2.354, 2.3485, 2.3602,
                       2.3362, 2.3555, 2.3559],
        "val_loss": [None, None, None, 2.9586, None, None, 2.623, None, None, 2.5368, None, None, 2.4956, None,
                     None, 2.4636, None, None, 2.4405, None, None, 2.4181, None, None, 2.3996, None, None, 2.3795,
                     None, None, 2.3707, None, None, 2.354, None, None, 2.3491],
    },
}


def reference_for(run_config: dict) -> dict | None:
    """The reference curve of a run's preset and recipe (data, tokeniser, lr, batch, warm-up), if any."""
    ref = REFERENCES.get(run_config.get("preset") or "")
    if not ref or run_config.get("data") != ref["data"] or run_config.get("tokenizer") != ref["tokenizer"]:
        return None
    train = run_config.get("train") or {}
    if any(train.get(k) != v for k, v in ref["recipe"].items() if k != "max_steps"):
        return None
    return ref
