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


def overfitting(metrics: list[dict], rise: float = 0.05, keeps_best: bool = False) -> Message | None:
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
        rose = (f"The validation loss rose from {vals[best_i]:.3f} (step {val_steps[best_i]}) to {vals[-1]:.3f} "
                "while the training loss kept falling: the model is memorising its training examples. ")
        if keeps_best:  # stages 5 and 6 keep the best-validation weights
            return Message("overfitting", rose + f"This run keeps the weights of its best step (here "
                                                 f"{val_steps[best_i]}), so the result is not hurt; fewer steps "
                                                 "would give the same model sooner.")
        return Message("overfitting", rose + "Keep the weights of the best step, use more data, or train for "
                                             "fewer steps.")
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


def health_messages(metrics: list[dict], reference: dict | None = None, fine_tuning: bool = False) -> list[Message]:
    """Every check that has something to say about this curve (none: it looks healthy).

    Fine-tuning (stages 5 and 6) logs the loss of small batches of a few messages or instructions,
    which jumps from one batch to the next whatever the learning rate: the jump check is left out.
    Those stages keep their best-validation weights, and the overfitting sentence says so."""
    found = [diverging(metrics), None if fine_tuning else lr_too_high(metrics),
             overfitting(metrics, keeps_best=fine_tuning)]
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
