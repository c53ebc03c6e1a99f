"""LoRA (core/gpt/lora.py): step 0 is the base model, merge = unmerge, only adapters learn."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from core.gpt import lora
from core.gpt.model import GPT, preset_config
from core.gpt.train import TrainConfig, TrainTask, make_optimizer
from core.lab.training import train
from core.lab import runs
from core.lab.models import load_model_weights, model_tensors


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models: one thread (on a shared 2-core machine a second thread made each step ~20x slower)."""
    monkeypatch.setenv("GLASSBOX_THREADS", "1")  # what the training loop configures
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(preset_config("tiny", vocab_size=97, **overrides))
    return model.eval()


def tokens(seed: int = 1, batch: int = 3, length: int = 20) -> torch.Tensor:
    return torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomise_adapters(model, std: float = 0.2) -> None:
    torch.manual_seed(5)
    for layer in lora.lora_layers(model).values():
        nn.init.normal_(layer.lora_B, std=std)


def test_step_zero_gives_the_base_models_logits_exactly():
    model = tiny_gpt()
    x = tokens()
    with torch.no_grad():
        before = model(x)[0]
        names = lora.add_lora(model, rank=4, alpha=16)
        after = model(x)[0]
    assert len(names) == 2 * 4  # 2 blocks x (qkv, proj, fc, proj)
    assert torch.equal(before, after)  # B = 0: not "close", identical


def test_merged_and_unmerged_give_the_same_logits_and_unmerge_restores_the_weights():
    model = tiny_gpt()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lora.add_lora(model, rank=4, alpha=8)
    randomise_adapters(model)
    x = tokens()
    with torch.no_grad():
        base = GPT(model.config).eval()
        load_model_weights(base, {k: v for k, v in original.items() if k != "lm_head.weight"})
        unmerged = model(x)[0]
        assert (unmerged - base(x)[0]).abs().max() > 1e-2  # the adapters really change the output
        lora.merge_lora(model)
        merged = model(x)[0]
        assert all(layer.merged for layer in lora.lora_layers(model).values())
        lora.unmerge_lora(model)
        again = model(x)[0]
    assert (merged - unmerged).abs().max() <= 1e-5
    assert (again - unmerged).abs().max() <= 1e-5
    qkv = model.blocks[0].attn.qkv
    assert (qkv.weight - original["blocks.0.attn.qkv.weight"]).abs().max() <= 1e-6


def test_remove_lora_leaves_an_ordinary_gpt_with_the_tuned_weights():
    model = tiny_gpt()
    lora.add_lora(model, rank=2, targets=("qkv", "mlp"))
    randomise_adapters(model)
    x = tokens()
    with torch.no_grad():
        tuned = model(x)[0]
        lora.remove_lora(model)
        plain = model(x)[0]
    assert not lora.lora_layers(model)
    assert type(model.blocks[0].attn.qkv) is nn.Linear
    assert (plain - tuned).abs().max() <= 1e-5
    # it saves and loads as a plain GPT: same tensor names as the base model had
    fresh = GPT(model.config).eval()
    load_model_weights(fresh, model_tensors(model))
    with torch.no_grad():
        assert (fresh(x)[0] - tuned).abs().max() <= 1e-5


def test_only_adapter_weights_receive_gradients_and_change():
    model = tiny_gpt()
    lora.add_lora(model, rank=4, targets=("qkv", "proj"))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    model.train()
    opt = make_optimizer(model, TrainConfig(max_steps=1, lr=1e-2), torch.device("cpu"))
    for _ in range(3):
        x = tokens(seed=2)
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        for name, p in model.named_parameters():
            if "lora_" in name:
                assert p.grad is not None, name
            else:
                assert p.grad is None, f"{name} is frozen but got a gradient"
        opt.step()
        opt.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, frozen[name]), f"{name} changed"
    assert model.blocks[0].attn.qkv.lora_B.abs().max() > 0  # the adapter learned something
    assert model.blocks[0].mlp.fc.__class__ is nn.Linear  # mlp was not a target


def test_parameter_count_and_memory_before_and_after():
    model = tiny_gpt()
    C = model.config.n_embd
    expected = 2 * (4 * (C + 3 * C) + 4 * (C + C) + 4 * (C + 4 * C) + 4 * (4 * C + C))
    assert lora.lora_parameter_count(model, 4) == expected
    lora.add_lora(model, rank=4)
    assert lora.trainable_parameters(model) == expected
    assert lora.training_memory(expected) == {"gradients": 4 * expected, "optimiser": 8 * expected}


def test_disabled_adapters_compute_the_base_model():
    model = tiny_gpt()
    x = tokens()
    with torch.no_grad():
        base = model(x)[0]
        lora.add_lora(model, rank=4)
        randomise_adapters(model)
        with lora.lora_disabled(model):
            off = model(x)[0]
        on = model(x)[0]
    assert torch.equal(off, base)
    assert (on - base).abs().max() > 1e-2
    lora.merge_lora(model)
    with pytest.raises(lora.LoRAError, match="Unmerge"):
        with lora.lora_disabled(model):
            pass


def test_adapter_tensors_round_trip_and_mismatch_is_named():
    model = tiny_gpt()
    lora.add_lora(model, rank=3)
    randomise_adapters(model)
    saved = {k: v.detach().clone() for k, v in lora.lora_tensors(model).items()}
    assert all(k.endswith(("lora_A", "lora_B")) for k in saved) and len(saved) == 16
    other = tiny_gpt()
    lora.add_lora(other, rank=3)
    lora.load_lora_tensors(other, saved)
    x = tokens()
    with torch.no_grad():
        assert torch.equal(other(x)[0], model(x)[0])
    smaller = tiny_gpt()
    lora.add_lora(smaller, rank=2)
    with pytest.raises(lora.LoRAError, match="shape"):
        lora.load_lora_tensors(smaller, saved)


@pytest.mark.parametrize("kwargs, message", [
    (dict(rank=0), "at least 1"),
    (dict(rank=-3), "at least 1"),
    (dict(rank=2.5), "whole number"),
    (dict(rank=65), "larger than the matrix"),  # the tiny preset is 64 wide
    (dict(rank=4, alpha=float("nan")), "alpha must be a positive number"),
    (dict(rank=4, alpha=0), "alpha must be a positive number"),
    (dict(rank=4, targets=("attention",)), "must be some of"),
    (dict(rank=4, targets=()), "must be some of"),
])
def test_bad_lora_settings_are_refused_and_the_model_is_left_alone(kwargs, message):
    model = tiny_gpt()
    with pytest.raises(lora.LoRAError, match=message):
        lora.add_lora(model, **kwargs)
    assert not lora.lora_layers(model)
    assert all(p.requires_grad for p in model.parameters())


def test_lora_on_a_model_without_the_named_matrices_says_which():
    class Classifier(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(8, 8)
            self.attn = nn.Module()
            self.attn.qkv = nn.Linear(8, 24)

    with pytest.raises(lora.LoRAError, match="no mlp matrices"):
        lora.add_lora(Classifier(), rank=2, targets=("qkv", "mlp"))
    names = lora.add_lora(Classifier(), rank=2, targets=("qkv",))
    assert names == ["attn.qkv"]


def test_lora_twice_is_refused():
    model = tiny_gpt()
    lora.add_lora(model, rank=2)
    with pytest.raises(lora.LoRAError, match="already"):
        lora.add_lora(model, rank=2)


class WindowTask(TrainTask):
    """Next-token prediction on fixed random windows: the batch of a step depends on the step only."""

    def __init__(self):
        self.data = torch.randint(0, 97, (64, 17), generator=torch.Generator().manual_seed(3))

    def get_batch(self, split, step, batch_size, generator):
        rows = torch.randint(0, len(self.data), (batch_size,), generator=generator)
        batch = self.data[rows]
        return batch[:, :-1], batch[:, 1:]

    def evaluate(self, model):
        _, loss = model(self.data[:8, :-1], self.data[:8, 1:])
        return {"val_loss": float(loss)}


def lora_model():
    model = tiny_gpt(seed=4)
    lora.add_lora(model, rank=4, alpha=8, targets=("qkv", "mlp"))
    return model


def test_resume_of_a_lora_training_run_is_exact():
    config = TrainConfig(max_steps=12, batch_size=4, lr=5e-3, warmup_steps=2, eval_every=6,
                         checkpoint_every=6, log_every=3, sample_every=100)
    straight = lora_model()
    a = train("lora-straight", straight, WindowTask(), config, device=torch.device("cpu"))

    def stop_at_6(record):
        if record.get("step") == 6 and "train_loss" in record:
            runs.request_stop("lora-resumed")

    first = train("lora-resumed", lora_model(), WindowTask(), config, progress=stop_at_6,
                  device=torch.device("cpu"))
    assert first["stopped"] is True and first["steps"] == 6
    runs.clear_stop("lora-resumed")
    second = lora_model()
    torch.manual_seed(77)
    for layer in lora.lora_layers(second).values():  # the checkpoint must overwrite the adapters
        nn.init.normal_(layer.lora_A)
    b = train("lora-resumed", second, WindowTask(), config, resume=True, device=torch.device("cpu"))
    assert b["steps"] == a["steps"] == 12
    assert math.isclose(a["val_loss"], b["val_loss"], rel_tol=0, abs_tol=1e-6)
    for (name, p), q in zip(lora.lora_tensors(straight).items(), lora.lora_tensors(second).values()):
        assert torch.allclose(p, q, atol=1e-6), name
    assert lora.lora_tensors(second)["blocks.0.attn.qkv.lora_B"].abs().max() > 0
