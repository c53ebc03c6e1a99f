"""'Is my run healthy?': the checks fire on crafted curves and stay silent on the reference runs;
the one-batch device check agrees with itself and flags a perturbed computation."""

import math

import pytest
import torch

from core.gpt import health
from core.lab import references
from core.gpt.model import GPT, GPTConfig


def rows(train, val=None, every=10):
    """Metrics rows: a train loss every `every` steps, and val losses at the steps given."""
    out = [{"step": (i + 1) * every, "train_loss": v, "lr": 1e-3} for i, v in enumerate(train)]
    for step, v in (val or {}).items():
        out.append({"step": step, "val_loss": v})
    return sorted(out, key=lambda r: r["step"])


def kinds(metrics, reference=None):
    return [m.kind for m in health.health_messages(metrics, reference)]


def falling(n=50, start=4.2, end=1.9):
    return [end + (start - end) * math.exp(-4 * i / n) for i in range(n)]


def test_a_healthy_curve_says_nothing():
    assert kinds(rows(falling(), {100: 3.0, 300: 2.2, 500: 2.0})) == []


def test_diverging_nan_and_climbing_back_up():
    assert kinds(rows(falling(20) + [float("nan")])) == ["diverging"]
    climbing = falling(30) + [2.0 + 0.3 * i for i in range(15)]
    assert "diverging" in kinds(rows(climbing))
    text = health.diverging(rows(climbing)).text
    assert "Lower the learning rate" in text


def test_too_high_a_learning_rate_is_a_jumpy_curve():
    jumpy = [3.0 + (0.6 if i % 2 else 0.0) for i in range(40)]
    assert "lr_too_high" in kinds(rows(jumpy))
    assert "lr_too_high" not in kinds(rows(falling()))


def test_overfitting_validation_rises_while_training_falls():
    metrics = rows(falling(60, 3.0, 0.3), {100: 1.2, 200: 0.9, 300: 1.1, 400: 1.4, 600: 1.7})
    assert kinds(metrics) == ["overfitting"]
    assert "(step 200)" in health.overfitting(metrics).text
    # validation flat after its best: not overfitting
    assert kinds(rows(falling(60, 3.0, 0.3), {100: 1.2, 200: 0.9, 300: 0.91})) == []


def test_a_plateau_far_above_the_reference():
    reference = {"step": [10, 500], "train_loss": [4.1, 1.8], "val_loss": [4.1, 1.9], "band": 0.1}
    flat = [4.2 - 0.3 * (1 - math.exp(-i / 3)) for i in range(50)]  # stuck near 3.9
    assert "plateau" in kinds(rows(flat), reference)
    assert kinds(rows(flat)) == []  # without a reference there is nothing to compare with
    assert "plateau" not in kinds(rows(falling(50, 4.1, 1.8)), reference)


def test_off_the_band_of_the_reference():
    reference = {"step": [0, 500], "train_loss": [4.2, 1.8], "val_loss": [4.2, 2.0], "band": 0.1}
    assert health.reference_at(reference, "val_loss", 250) == pytest.approx(3.1)
    assert kinds(rows(falling(50, 4.2, 1.8), {500: 2.6}), reference) == ["off_band"]
    assert kinds(rows(falling(50, 4.2, 1.8), {500: 2.05}), reference) == []


def config_matching(ref: dict) -> dict:
    """A run config that the reference's match and recipe describe ("a.b" paths become nested dicts)."""
    config: dict = {"train": dict(ref["recipe"])}
    for path, value in ref["match"].items():
        *parents, last = path.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    return config


@pytest.mark.parametrize("name", sorted(references.REFERENCES))
def test_the_reference_runs_themselves_are_healthy(name):
    ref = references.REFERENCES[name]
    metrics = [{"step": s, "train_loss": t, "val_loss": v} for s, t, v in zip(ref["step"], ref["train_loss"], ref["val_loss"])]
    found = health.health_messages(metrics, ref, fine_tuning=ref["stage"] != "pretrain")
    if ref["stage"] == "pretrain":
        assert found == []
    else:  # fine-tuning's default budget runs past the best step; the run keeps that step's weights
        assert [m.kind for m in found] in ([], ["overfitting"])
        assert all("keeps the weights of its best step" in m.text for m in found)
    assert ref["machine"] and ref["recipe"]["lr"] > 0 and ref["command"].startswith("python -m core ")
    run_config = config_matching(ref)
    assert references.reference_for(run_config, ref["stage"]) is ref
    assert references.reference_for({**run_config, "train": {**ref["recipe"], "lr": 1.0}}, ref["stage"]) is None
    other = "classify" if ref["stage"] != "classify" else "pretrain"
    assert references.reference_for(run_config, other) is None
    budget = {k: v for k, v in ref["recipe"].items() if k not in references.BUDGET_KEYS}
    assert references.reference_for({**run_config, "train": {**budget, "max_steps": 7}}, ref["stage"]) is ref


def tiny_model():
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=20, context_length=8, n_embd=16, n_head=2, n_layer=1))


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 20, (4, 8), generator=g)
    return x, torch.roll(x, -1, dims=1)


def test_the_device_check_agrees_with_itself_on_the_cpu():
    check = health.device_check(tiny_model(), *batch(), "cpu")
    assert check["ok"] and check["difference"] < 1e-6
    assert abs(check["cpu_loss"] - math.log(20)) < 0.5  # an untrained model: near ln(V)
    assert health.device_message(check) is None


def test_the_device_check_flags_a_perturbed_computation():
    def perturb(model):  # the device's output layer computes something slightly else
        model.lm_head.register_forward_hook(lambda module, inputs, out: out + torch.linspace(0, 0.1, out.shape[-1]))

    check = health.device_check(tiny_model(), *batch(), "cpu", alter=perturb)
    assert not check["ok"] and check["difference"] > 1e-3
    message = health.device_message(check)
    assert "computes something else" in message and "--device cpu" in message


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_computes_the_cpu_loss_to_1e_3():
    check = health.device_check(tiny_model(), *batch(), "cuda")
    assert check["ok"], check
