"""Training history: snapshots at log-spaced steps within a disk budget, surviving stop and resume;
a snapshot gives the logits of the weights it copies; the views of one snapshot; bad input."""

import pytest
import torch

from core.__main__ import run_command
from core.gpt.errors import GlassBoxError, TrainingError
from core.gpt.model import GPT, GPTConfig
from core.gpt.pretrain import LanguageModelTask
from core.gpt.tokenizers import train_char
from core.gpt.train import TrainConfig
from core.lab import runs, snapshots
from core.lab.errors import CorruptRunError
from core.lab.models import load_model_weights, save_model_run
from core.lab.training import train
from core.stages import snapshots as stage

TEXT = "the cat sat on the mat. the dog sat on the log. " * 60


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("GLASSBOX_THREADS", "1")


def tiny_model(seed=0):
    torch.manual_seed(seed)
    tok = train_char(TEXT)
    return GPT(GPTConfig(vocab_size=tok.vocab_size, context_length=16, n_embd=32, n_head=2, n_layer=2)), tok


def tiny_task(tok):
    return LanguageModelTask(tok.encode(TEXT), context_length=16, tokenizer=tok, sample_tokens=5)


def config(**kw):
    return TrainConfig(**{**dict(max_steps=35, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=100,
                                 eval_batches=2, sample_every=1000, checkpoint_every=100, log_every=5, seed=7), **kw})


def new_run(run_id, model, tok, budget_mb=50.0):
    runs.create_run(run_id, "pretrain", {"snapshots": {"budget_bytes": int(budget_mb * 2**20)}})
    save_model_run(run_id, model, tok)
    return snapshots.Plan(int(budget_mb * 2**20), model)


def steps_on_disk(run_id):
    return [s.step for s in snapshots.list_snapshots(runs.run_dir(run_id))]


def test_log_spaced_steps():
    assert [s for s in range(5000) if snapshots.log_spaced(s)] == [0, 10, 30, 100, 300, 1000, 3000]


def test_snapshots_at_the_promised_steps_survive_stop_and_resume():
    model, tok = tiny_model()
    plan = new_run("hist", model, tok)

    def stop_at_12(record):
        if record.get("step") == 12 and "train_loss" in record:
            runs.request_stop("hist")

    first = train("hist", model, tiny_task(tok), config(log_every=1), progress=stop_at_12, snapshot_plan=plan)
    assert first["stopped"] and first["steps"] == 12
    assert steps_on_disk("hist") == [0, 10, 12]  # and the step it stopped at
    runs.clear_stop("hist")
    other, _ = tiny_model(seed=5)
    done = train("hist", other, tiny_task(tok), config(log_every=1), resume=True, snapshot_plan=plan)
    assert done["steps"] == 35
    assert steps_on_disk("hist") == [0, 10, 30, 35]  # 12 was only "the last" until 35 came
    assert stage.run(stage.Settings(run="hist"))["steps"] == [0, 10, 30, 35]


def test_a_snapshot_gives_the_logits_of_the_weights_saved_at_that_step():
    model, tok = tiny_model()
    plan = new_run("same", model, tok)
    train("same", model, tiny_task(tok), config(max_steps=30), snapshot_plan=plan)
    path = runs.run_dir("same")
    saved = runs.load_tensors(path / "model.safetensors")  # the checkpoint of step 30
    snap = next(s for s in snapshots.list_snapshots(path) if s.step == 30)
    from_snapshot, from_checkpoint, rounded = (tiny_model(seed=s)[0].eval() for s in (1, 2, 3))
    load_model_weights(from_snapshot, snapshots.load_snapshot(snap))
    load_model_weights(from_checkpoint, saved)
    load_model_weights(rounded, {k: v.half().float() for k, v in saved.items()})
    x = torch.tensor([tok.encode("the cat sat on t")])
    with torch.no_grad():
        a, b, c = (m(x)[0] for m in (from_snapshot, from_checkpoint, rounded))
    assert torch.equal(a, c)  # exactly the saved weights, rounded to fp16
    assert torch.allclose(a, b, atol=5e-2)  # and fp16 is close enough to view
    assert snap.bytes < path.joinpath("model.safetensors").stat().st_size * 0.6


def test_the_budget_is_kept_and_a_budget_for_fewer_than_two_is_refused():
    model, tok = tiny_model()
    one = snapshots.snapshot_bytes(model)
    plan = new_run("tight", model, tok, budget_mb=3.2 * one / 2**20)
    train("tight", model, tiny_task(tok), config(max_steps=35), snapshot_plan=plan)
    found = snapshots.list_snapshots(runs.run_dir("tight"))
    assert sum(s.bytes for s in found) <= plan.budget_bytes
    assert found[0].step == 0 and found[-1].step == 35 and len(found) == 3
    with pytest.raises(TrainingError, match="cannot hold even two"):
        snapshots.Plan(int(1.5 * one), model)
    assert not snapshots.Plan(0, model).enabled  # 0: no snapshots at all


def test_views_of_a_snapshot_and_bad_input():
    model, tok = tiny_model()
    plan = new_run("views", model, tok)
    train("views", model, tiny_task(tok), config(max_steps=12), snapshot_plan=plan)
    v = stage.views("views", 10, query="a")
    assert v["step"] == 10 and len(v["map"]) == tok.vocab_size and len(v["explained"]) == 2
    assert v["neighbours"][0] == ("a", 1.0)
    assert len(v["losses"]) == len(v["tokens"]) - 1 and v["continuation"]
    layers, heads = len(v["attention"]), len(v["attention"][0])
    assert (layers, heads) == (2, 2) and len(v["positions"]) == 16
    assert stage.views("views", 10, query="Z")["query_error"].startswith("'Z' is not a single token")
    # a damaged snapshot is named and skipped; a missing one is named
    snap_10 = runs.run_dir("views") / "snapshots" / "step-000010.safetensors"
    snap_10.write_bytes(b"not a safetensors file")
    listed = stage.results("views")
    assert 10 not in listed["steps"] and 0 in listed["steps"]
    assert any("step-000010.safetensors" in s for s in listed["skipped"])
    with pytest.raises(CorruptRunError, match="step-000010"):
        stage.views("views", 10)
    with pytest.raises(CorruptRunError, match="step 30"):
        stage.views("views", 30)


def test_a_run_saved_before_snapshots_existed_says_so():
    model, tok = tiny_model()
    runs.create_run("old", "pretrain", {})
    save_model_run("old", model, tok)
    history = stage.results("old")
    assert history["steps"] == [] and "before training snapshots existed" in history["note"]
    assert stage.views("old", None)["step"] is None  # its final weights still show
    out = stage.run(stage.Settings(run="old"))
    assert out["steps"] == [] and out["bytes"] == 0 and out["budget_bytes"] is None
    with pytest.raises(GlassBoxError, match="Name the run"):
        stage.Settings()


def test_pretrain_reports_its_disk_and_snapshot_budget(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text(TEXT)
    out = run_command(["pretrain", "--data", f"file:{corpus}", "--preset", "tiny", "--context-length", "16",
                       "--batch-size", "8", "--steps", "11", "--eval-batches", "2", "--sample-tokens", "4",
                       "--snapshot-mb", "5", "--run-id", "cli-snap", "--quiet"])
    assert out["steps"] == 11
    run = runs.open_run("cli-snap")
    assert run.config["snapshots"]["budget_bytes"] == 5 * 2**20 and run.config["snapshots"]["probe"]
    assert run.config["disk_bytes"] >= sum(p.stat().st_size for p in (run.path / "snapshots").iterdir())
    assert steps_on_disk("cli-snap") == [0, 10, 11]
    with pytest.raises(TrainingError, match="cannot hold even two"):
        run_command(["pretrain", "--data", f"file:{corpus}", "--preset", "tiny", "--steps", "2",
                     "--snapshot-mb", "0.001", "--run-id", "cli-snap2", "--quiet"])
