"""The one training loop, shared by pre-training (stage 4), classification (5) and instructions (6).

Every step takes a batch of token windows, measures how wrong the model's next-token guesses are
(the loss), and nudges every weight a little downhill (AdamW). Read it in this order:
`TrainConfig` (how long and how to train) and `TrainTask` (what differs between stages); the
learning-rate schedule (a linear warm-up, then a cosine down to `min_lr` exactly where the budget
of steps, tokens or minutes ends); `make_optimizer`; `train_step`, the heart of it; `train_loop`.

The loop writes no files. Saving checkpoints, logging metrics, the Stop button and several
processes training together come in through `TrainHooks` (the run store's are in
`core/lab/training.py`). Exact resume rests on one rule: the batch of step `s` is a pure function
of `(seed, s)` (`batch_generator`), so a run stopped and resumed ends where a straight one does.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass, field, fields

import torch

from core.gpt.errors import TrainingError


@dataclass
class TrainConfig:
    """How long and how to train. One of the three budgets must be set (the first reached ends)."""

    max_steps: int | None = None
    max_minutes: float | None = None
    max_tokens: int | None = None
    batch_size: int = 32  # sequences per micro-batch (the global batch is batch_size × grad_accum)
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0  # 0 turns clipping off
    eval_every: int = 100
    eval_batches: int = 20
    sample_every: int = 200
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 1337

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        if "betas" in kwargs:
            kwargs["betas"] = tuple(kwargs["betas"])
        return cls(**kwargs)

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum


class TrainTask:
    """What one stage trains on: override `get_batch`, and usually `evaluate` and `sample`.

    `prepare(config, device)` is called once before the first step. Batches may be returned on the
    CPU. `evaluate` and `sample` run under `torch.no_grad()` with the model in eval mode.
    """

    config: TrainConfig | None = None
    device: torch.device | None = None

    def prepare(self, config: TrainConfig, device: torch.device) -> None:
        self.config = config
        self.device = device

    def check(self, config: TrainConfig) -> None:
        """Raise TrainingError if these settings cannot work with this task's data."""

    def get_batch(self, split: str, step: int, batch_size: int, generator: torch.Generator):
        """The batch of `split` for this `step`: `(inputs, targets)`, drawn with `generator` only."""
        raise NotImplementedError

    def loss(self, model, inputs, targets) -> torch.Tensor:
        _, loss = model(inputs, targets)
        return loss

    def evaluate(self, model) -> dict[str, float]:
        return {}

    def sample(self, model) -> str | None:
        return None

    def tokens_in_batch(self, inputs) -> int:
        return int(inputs.numel())


def check_config(config: TrainConfig) -> None:
    """Refuse settings that cannot train, with a message a learner can act on."""
    for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
        value = getattr(config, name)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TrainingError(f"The {name.replace('_', ' ')} must be a number, not {value!r}.")
    if config.lr <= 0:
        raise TrainingError(f"The learning rate must be above 0 (got {config.lr}); try 1e-3.")
    if config.min_lr < 0 or config.min_lr > config.lr:
        raise TrainingError(f"The minimum learning rate must be between 0 and the learning rate "
                            f"{config.lr} (got {config.min_lr}).")
    if config.weight_decay < 0 or config.grad_clip < 0:
        raise TrainingError("Weight decay and gradient clipping cannot be negative.")
    for name in ("batch_size", "grad_accum", "eval_every", "eval_batches", "sample_every",
                 "checkpoint_every", "log_every"):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TrainingError(f"{name.replace('_', ' ').capitalize()} must be a whole number ≥ 1 (got {value!r}).")
    for name, label in (("warmup_steps", "Warm-up steps"), ("seed", "The seed")):
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise TrainingError(f"{label} must be a whole number ≥ 0 (got {value!r}).")
    budgets = [config.max_steps, config.max_minutes, config.max_tokens]
    if budgets == [None, None, None]:
        raise TrainingError("Give the run a budget: a number of steps, minutes or tokens.")
    for name, value in zip(("steps", "minutes", "tokens"), budgets):
        if value is not None and (not math.isfinite(value) or value <= 0):
            raise TrainingError(f"The budget of {name} must be above 0 (got {value}).")
    if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
        raise TrainingError(f"AdamW betas must be two numbers in [0, 1) (got {config.betas}).")


# ---------------------------------------------------------------------------- the schedule


def effective_warmup(config: TrainConfig) -> int:
    """Warm-up length: as configured, but never more than a fifth of a step budget."""
    if config.max_steps:
        return min(config.warmup_steps, config.max_steps // 5)
    return config.warmup_steps


def budget_progress(config: TrainConfig, step: int, tokens: int, elapsed_s: float,
                    reserve_s: float = 0.0) -> float:
    """How much of the budget is used, 0 → 1 (the furthest along of the budgets that are set).

    A step budget counts from the end of the warm-up (as nanoGPT does); `reserve_s` keeps time
    back from a minutes budget for the final evaluation and checkpoint.
    """
    done = 0.0
    if config.max_steps:
        warmup = effective_warmup(config)
        done = max(done, (step - warmup) / max(1, config.max_steps - warmup))
    if config.max_tokens:
        done = max(done, tokens / config.max_tokens)
    if config.max_minutes:
        done = max(done, elapsed_s / max(1e-9, config.max_minutes * 60 - reserve_s))
    return min(max(done, 0.0), 1.0)


def learning_rate(config: TrainConfig, step: int, progress: float) -> float:
    """Linear warm-up for `warmup_steps`, then cosine from `lr` down to `min_lr` at the budget's end."""
    warmup = effective_warmup(config)
    if step < warmup:
        return config.lr * (step + 1) / (warmup + 1)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 → 0
    return config.min_lr + cosine * (config.lr - config.min_lr)



# ---------------------------------------------------------------------------- the optimiser


def make_optimizer(model: torch.nn.Module, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and LayerNorm gains, as in GPT-2).

    The fused implementation does the whole update in one kernel: measured 4–7× faster than the
    plain loop on this CPU, and it exists on CUDA too.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    kwargs = dict(lr=config.lr, betas=tuple(config.betas))
    if torch.device(device).type in ("cpu", "cuda"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            pass  # an older torch without fused AdamW on this device
    return torch.optim.AdamW(groups, **kwargs)


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The random stream that draws the batch of `step`: a pure function of (seed, step)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


# ---------------------------------------------------------------------------- one step


@dataclass
class TrainState:
    """Where a run stands: what a checkpoint saves and a resume restores."""

    step: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0  # training time before this session began
    last_eval: dict = field(default_factory=dict)
    checkpoint_step: int | None = None  # the step of the last checkpoint saved (None: none yet)
    optimizer: torch.optim.Optimizer | None = None  # built at the first update (see train_step)


class TrainHooks:
    """What the loop asks of the world around it. These defaults: one process, nothing written.

    `core/lab/training.py` overrides them to write a run (metrics, samples, checkpoints), to
    answer the Stop button, and to keep several `torchrun` processes in step.
    """

    def stop_requested(self, state: TrainState) -> bool:  # the Stop button
        return False

    def agree(self, stop: bool, reached: bool, elapsed: float) -> tuple[bool, bool, float]:
        """Every process must make the same decisions: rank 0's (distributed training)."""
        return stop, reached, elapsed

    def share(self, inputs, targets):
        """This process's slice of the global batch (distributed training)."""
        return inputs, targets

    def gradient_sync(self, model, last_piece: bool):
        """Gradients are averaged across processes once, after the last piece of the batch."""
        return contextlib.nullcontext()

    def mean_loss(self, loss: float) -> float:
        return loss

    def log(self, record: dict) -> None: ...  # a metrics row; the others: a sample, a checkpoint
    def sample(self, state: TrainState, text: str, elapsed: float) -> None: ...
    def checkpoint(self, state: TrainState, elapsed: float) -> None: ...
    def weights_at(self, model, state: TrainState) -> None: ...  # after `state.step` updates (snapshots)


def mixed_precision(device: torch.device):
    """bf16 autocast on a GPU that has it; plain fp32 elsewhere (bf16 is ~14× slower on this CPU)."""
    use = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast("cuda", dtype=torch.bfloat16) if use else contextlib.nullcontext()


def train_step(model, task: TrainTask, inputs, targets, config: TrainConfig, lr: float,
               state: TrainState, hooks: TrainHooks, on_loss=None) -> float:
    """One step of gradient descent on one batch; returns its loss (NaN: the step was skipped).

    The batch is cut into `grad_accum` pieces so a big batch fits in memory: their gradients add
    up in `.grad` as if it had been one. `on_loss` sees the loss before the update (a fresh run
    draws its first point there, before AdamW's first-use imports cost a few seconds).
    """
    device = next(model.parameters()).device
    micro = len(inputs) // config.grad_accum if len(inputs) >= config.grad_accum else len(inputs)
    pieces = list(zip(inputs.split(micro), targets.split(micro)))
    loss = 0.0
    for i, (x, y) in enumerate(pieces):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with hooks.gradient_sync(model, last_piece=i == len(pieces) - 1):
            with mixed_precision(device):
                piece = task.loss(model, x, y) / len(pieces)  # forward: how wrong were the guesses?
            piece.backward()  # backward: how each weight moved the loss (added into .grad)
        loss += piece.item()
    loss = hooks.mean_loss(loss)
    if on_loss is not None:
        on_loss(loss)
    if not math.isfinite(loss):
        return float("nan")
    if state.optimizer is None:  # the one place AdamW is built (a resume brings its own)
        state.optimizer = make_optimizer(model, config, device)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    if config.grad_clip > 0:  # one bad batch cannot throw the weights far
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        if not torch.isfinite(norm):
            return float("nan")
    state.optimizer.step()  # every weight moves a little downhill
    state.optimizer.zero_grad(set_to_none=True)
    return loss


# ---------------------------------------------------------------------------- the loop


class Clock:
    """Training seconds: those of earlier sessions plus this one's (`eval_s`: the last evaluation's)."""

    def __init__(self, before_s: float = 0.0):
        self.before_s, self.t0, self.eval_s = before_s, time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return self.before_s + (time.perf_counter() - self.t0)


class LossWindow:
    """The steps since the last metrics row: their mean loss, and the tokens per second they ran at."""

    def __init__(self, tokens: int):
        self.reset(tokens)

    def reset(self, tokens: int) -> None:
        self.losses, self.t, self.tokens = [], time.perf_counter(), tokens

    def mean(self) -> float:
        return sum(self.losses) / len(self.losses)
    def record(self, step: int, tokens: int, train_loss: float, lr: float, elapsed: float) -> dict:
        seconds = max(1e-9, time.perf_counter() - self.t)
        return {"step": step, "tokens": tokens, "train_loss": round(train_loss, 5), "lr": lr,
                "tokens_per_s": round((tokens - self.tokens) / seconds, 1), "elapsed_s": round(elapsed, 3)}


def budget_reached(config: TrainConfig, state: TrainState, clock: Clock) -> bool:
    """True when any budget is spent (time for the final evaluation is kept back from minutes)."""
    return bool((config.max_steps and state.step >= config.max_steps)
                or (config.max_tokens and state.tokens >= config.max_tokens)
                or (config.max_minutes and clock.elapsed() + clock.eval_s >= config.max_minutes * 60))


def evaluate(model, task: TrainTask, state: TrainState, clock: Clock) -> dict:
    """The task's held-out figures (e.g. val_loss), with dropout off and no gradients."""
    t = time.perf_counter()
    model.eval()
    with torch.no_grad():
        state.last_eval = {k: float(v) for k, v in (task.evaluate(model) or {}).items()}
    model.train()
    clock.eval_s = time.perf_counter() - t
    return state.last_eval


def write_sample(model, task: TrainTask, config: TrainConfig, state: TrainState, hooks: TrainHooks,
                 clock: Clock) -> None:
    """A text sample, from its own random stream: sampling must not shift the run's (exact resume)."""
    device = next(model.parameters()).device
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed + state.step)
        with torch.no_grad():
            text = task.sample(model)
    model.train()
    if text is not None:
        hooks.sample(state, text, clock.elapsed())


def nan_error(state: TrainState) -> TrainingError:
    kept = (f"The last good checkpoint (step {state.checkpoint_step}) is kept; resume from it with a "
            "lower learning rate.")
    if not state.checkpoint_step:
        kept = "No checkpoint had been saved yet; start again with a lower learning rate."
    return TrainingError(f"The loss became NaN (not a number) at step {state.step + 1}: training "
                         f"diverged, so it stopped. {kept}")


def summary(state: TrainState, clock: Clock, tokens_at_start: int, train_loss, stopped: bool) -> dict:
    """What the session did: the figures the command line prints (and the last evaluation's)."""
    session_s = max(1e-9, time.perf_counter() - clock.t0)
    out = {"steps": state.step, "tokens": state.tokens, "train_loss": train_loss,
           "val_loss": state.last_eval.get("val_loss"),
           "tokens_per_s": round((state.tokens - tokens_at_start) / session_s, 1),
           "seconds": round(clock.elapsed(), 2), "stopped": stopped}
    for k, v in state.last_eval.items():
        out.setdefault(k, v)
    return out


def save(state: TrainState, hooks: TrainHooks, clock: Clock) -> None:  # a checkpoint, and where it is
    hooks.checkpoint(state, clock.elapsed())
    state.checkpoint_step = state.step


def after_step(model, task, config, state, hooks, clock, window, lr, first_logged: bool):
    """Log, evaluate, sample and checkpoint when their turn comes; returns the train loss logged (or None)."""
    done = budget_reached(config, state, clock)
    at_eval = state.step % config.eval_every == 0 or done
    train_loss = None
    if first_logged:  # step 1's loss went out before its update; only its evaluation is left
        train_loss = window.mean()
        window.losses = []
        if at_eval:
            hooks.log({"step": 1, "tokens": state.tokens, **evaluate(model, task, state, clock),
                       "elapsed_s": round(clock.elapsed(), 3)})
    elif state.step % config.log_every == 0 or at_eval or state.step == 1:
        train_loss = window.mean()
        record = window.record(state.step, state.tokens, train_loss, lr, clock.elapsed())
        if at_eval:
            record.update(evaluate(model, task, state, clock))
            record["elapsed_s"] = round(clock.elapsed(), 3)
        hooks.log(record)
        window.reset(state.tokens)
    if state.step == 1 or state.step % config.sample_every == 0 or done:
        write_sample(model, task, config, state, hooks, clock)
    if state.step % config.checkpoint_every == 0 or done:
        save(state, hooks, clock)
    return train_loss


def train_loop(model, task: TrainTask, config: TrainConfig, state: TrainState | None = None,
               hooks: TrainHooks | None = None) -> dict:
    """Train until the budget is spent or a stop is asked for; returns a summary of this session.

    `model` may come wrapped for distributed training (DistributedDataParallel): the steps go
    through the wrapper, evaluation and samples use the model inside it.
    """
    state, hooks = state or TrainState(), hooks or TrainHooks()
    inner = getattr(model, "module", model)
    clock, window, tokens_at_start, train_loss = Clock(state.elapsed_s), LossWindow(state.tokens), state.tokens, None
    model.train()
    model.zero_grad(set_to_none=True)
    while True:
        hooks.weights_at(inner, state)
        stop, reached, elapsed = hooks.agree(hooks.stop_requested(state), budget_reached(config, state, clock),
                                             clock.elapsed())
        if stop:
            save(state, hooks, clock)
            return summary(state, clock, tokens_at_start, train_loss, stopped=True)
        if reached:
            break
        lr = learning_rate(config, state.step, budget_progress(config, state.step, state.tokens, elapsed,
                                                               clock.eval_s))
        first = []

        def first_point(loss):  # a fresh run's first point, drawn before the update
            if state.step == 0 and math.isfinite(loss):
                hooks.log(window.record(1, state.tokens + n_tokens, loss, lr, clock.elapsed()))
                first.append(loss)

        try:
            batch = task.get_batch("train", state.step, config.global_batch, batch_generator(config.seed, state.step))
            n_tokens = task.tokens_in_batch(batch[0])
            loss = train_step(model, task, *hooks.share(*batch), config, lr, state, hooks, on_loss=first_point)
        except KeyboardInterrupt:  # Ctrl-C on the command line: keep the work done so far
            model.zero_grad(set_to_none=True)
            save(state, hooks, clock)
            return summary(state, clock, tokens_at_start, train_loss, stopped=True)
        if not math.isfinite(loss):
            raise nan_error(state)
        state.step, state.tokens = state.step + 1, state.tokens + n_tokens
        if first:
            window.reset(state.tokens)
        window.losses.append(loss)
        logged = after_step(inner, task, config, state, hooks, clock, window, lr, first_logged=bool(first))
        train_loss = logged if logged is not None else train_loss
    if state.checkpoint_step != state.step:
        save(state, hooks, clock)  # the budget was already reached when this session began
    return summary(state, clock, tokens_at_start, train_loss, stopped=False)
