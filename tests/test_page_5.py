"""Stage 5 page: renders with no runs, and with finished classifier runs (results, own message,
side by side)."""

import json
import time
from pathlib import Path

import torch
from streamlit.testing.v1 import AppTest

from core.lab import runs
from core.gpt.model import GPT, GPTConfig
from core.lab.models import save_model_run
from core.gpt import classify as C
from core.gpt.tokenizers import train_char
from core.lab.models import model_tensors
from core.lab.tokenizer_files import save_tokenizer
from tests.page_helpers import all_text, run_page

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "5_Classification.py")
TINY = dict(context_length=32, n_embd=16, n_head=2, n_layer=1)
HTML_MESSAGE = "<b>WIN</b> a prize & call now"


def page() -> AppTest:
    return run_page(PAGE)


def make_start_run(run_id="base"):
    tokenizer = train_char("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'£&<>/")
    torch.manual_seed(0)
    runs.create_run(run_id, "pretrain", {"data": "tinyshakespeare"})
    save_model_run(run_id, GPT(GPTConfig(vocab_size=tokenizer.vocab_size, **TINY)), tokenizer)
    return tokenizer


def make_finished_classifier(run_id, tokenizer, random_init=False, test_accuracy=0.9):
    """A classifier run as `fine_tune` leaves it (weights, config, metrics, results), made quickly."""
    config = GPTConfig(vocab_size=tokenizer.vocab_size, **TINY)
    model = C.make_classifier(GPT(config), "last-block")
    info = {"labels": list(C.LABELS), "num_classes": 2, "freeze": "last-block", "random_init": random_init,
            "start_run": "base", "data": "sms-spam", "pad_length": 32, "pad_id": tokenizer.eot_id,
            "trainable_parameters": 4000, "parameters": 9000}
    run = runs.create_run(run_id, "classify", {"model": config.to_dict(), "classifier": info}, parent="base")
    runs.save_tensors(run.path / "model.safetensors", model_tensors(model))
    save_tokenizer(tokenizer, run.path / "tokenizer.json")
    for step in (10, 20):
        runs.append_jsonl(run.path / "metrics.jsonl", {
            "step": step, "train_loss": 0.7 - step / 100, "val_loss": 0.65 - step / 100,
            "val_accuracy": 0.6 + step / 100, "train_accuracy": 0.62 + step / 100})
    wrong = 300 - round(test_accuracy * 300)
    results = {"labels": ["ham", "spam"], "train_accuracy": 0.95, "val_accuracy": 0.92,
               "test_accuracy": test_accuracy, "train_loss": 0.2, "val_loss": 0.25, "test_loss": 0.3,
               "confusion_matrix": [[137 - wrong, wrong], [0, 163]], "misclassified_count": wrong,
               "misclassified": [{"text": HTML_MESSAGE, "label": "ham", "predicted": "spam", "p_spam": 0.8}]
               * wrong, "steps": 20, "stopped": False, "seconds": 3.0}
    runs.write_json_atomic(run.path / "results.json", results)
    runs.write_status(run_id, "finished", message="Finished.")


def test_page_with_no_runs_explains_what_to_do_first():
    at = page()
    text = all_text(at)
    assert "No pre-trained model yet" in text
    assert "python -m core pretrain" in text
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["ham (raw)"] == "4,827" and metrics["spam (raw)"] == "747"
    assert (metrics["train"], metrics["validation"], metrics["test"]) == ("1045", "149", "300")
    assert not at.button  # no start form without a start run


def ticking_run_ids(monkeypatch):
    """A new default run name on every call, as when the clock's second ticks between reruns."""
    calls = iter(range(10**6))
    monkeypatch.setattr(runs, "new_run_id", lambda prefix: f"{prefix}-tick-{next(calls)}")


def test_page_with_a_start_run_starts_a_job_with_the_chosen_settings(monkeypatch):
    ticking_run_ids(monkeypatch)  # the name typed below must survive a changing default
    make_start_run()
    at = page()
    assert "No pre-trained model yet" not in all_text(at)
    at.radio[0].set_value("random")  # starting weights
    at.radio[1].set_value("head")  # what learns
    at.number_input[0].set_value(2.0)
    at.text_input[0].set_value("from-page")
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert (runs.run_dir("from-page") / "job.json").is_file(), all_text(at)
    job = json.loads((runs.run_dir("from-page") / "job.json").read_text())
    argv = job["argv"]
    assert argv[:3] == ["classify", "--from", "base"]
    assert "--random-init" in argv and argv[argv.index("--freeze") + 1] == "head"
    assert argv[argv.index("--steps") + 1] == "2" and argv[argv.index("--run-id") + 1] == "from-page"
    assert at.session_state["classify_run"] == "from-page"
    assert any("from-page" in m.value for m in at.markdown)  # its job is shown straight away
    from core.lab import jobs

    jobs.stop_job("from-page", force=True)


def test_page_shows_results_own_message_and_side_by_side():
    tokenizer = make_start_run()
    make_finished_classifier("spam-random", tokenizer, random_init=True, test_accuracy=0.8)
    time.sleep(1.1)  # list_runs orders by creation second: make the pre-trained run the newest
    make_finished_classifier("spam-pretrained", tokenizer)
    at = page()
    text = all_text(at)
    assert "How well does it do?" in text
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["test accuracy"] == "90.0%" and metrics["validation accuracy"] == "92.0%"
    assert "Misclassified test messages (30)" in text
    frames = [df.value for df in at.dataframe]
    wrong = next(f for f in frames if "P(spam)" in f.columns)
    assert wrong["message"].iloc[0] == HTML_MESSAGE  # shown as text, not rendered as HTML
    assert "<b>WIN</b>" not in "".join(m.value for m in at.markdown)
    # Side by side: both runs, their test accuracies.
    table = next(f for f in frames if "test acc" in f.columns)
    assert set(table["run"]) == {"spam-pretrained", "spam-random"}
    assert sorted(table["test acc"]) == [0.8, 0.9]

    # Try your own message: probabilities for both classes; a long one is truncated with a note.
    at.text_area[0].input("Free entry! Text WIN to 80086 now <script>")
    at.button[-1].click().run()
    assert not at.exception, at.exception
    assert any("The model says" in m.value for m in at.markdown)
    assert "<script>" not in "".join(m.value for m in at.markdown)
    at.text_area[0].input("a very long message " * 10)
    at.button[-1].click().run()
    assert any("only the first 32 tokens" in i.value for i in at.info)
    at.text_area[0].input("   ")
    at.button[-1].click().run()
    assert any("Type a message" in e.value for e in at.error)


def test_the_cost_of_each_choice_is_shown_before_training():
    make_start_run()
    at = page()
    assert not at.exception, at.exception
    costs = next(df.value for df in at.dataframe if "trainable parameters" in df.value.columns)
    assert list(costs["what learns"]) == ["head", "last-block", "all", "lora"]
    assert costs["trainable parameters"].iloc[0] == 16 * 2 + 2  # the new head: n_embd × 2 + 2 biases
    assert costs["share"].iloc[2] == 1.0 and costs["step time (ms)"].isna().all()
    at.toggle(key="classify_time").set_value(True).run()
    costs = next(df.value for df in at.dataframe if "trainable parameters" in df.value.columns)
    assert (costs["step time (ms)"] > 0).all()


def test_the_curves_mark_the_step_whose_weights_the_run_keeps():
    tokenizer = make_start_run()
    make_finished_classifier("kept", tokenizer)
    path = runs.run_dir("kept") / "results.json"
    runs.write_json_atomic(path, {**json.loads(path.read_text()), "weights_step": 10})
    at = page()
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    marked = [s for s in specs if any(a.get("text") == "kept weights" for a in s["layout"].get("annotations", []))]
    assert len(marked) == 2  # the loss and the accuracy curves
    assert all(shape["x0"] == 10 for s in marked for shape in s["layout"]["shapes"])


def test_the_time_slider_shows_the_classifiers_verdict_at_a_chosen_snapshot():
    """Issue 19's slider on page 5: a classifier run with snapshots at 0 and 20; moving the slider
    redraws the verdict on the probe message, P(spam) after each token, attention and the map."""
    from core.lab import snapshots

    tokenizer = make_start_run()
    make_finished_classifier("spam-h", tokenizer)
    run = runs.open_run("spam-h")
    config = json.loads((run.path / "config.json").read_text())
    config["snapshots"] = snapshots.default_budget(C.build_classifier(config["model"]), False,
                                                   snapshots.CLASSIFIER_PROBE)
    runs.write_json_atomic(run.path / "config.json", config)
    model = C.build_classifier(config["model"])
    plan = snapshots.Plan(config["snapshots"]["budget_bytes"], model)
    for step in (0, 20):
        with torch.no_grad():
            model.lm_head.bias.copy_(torch.tensor([2.0, -2.0]) if step == 0 else torch.tensor([-2.0, 2.0]))
        plan.save(run.path, model, step)
    at = page()
    assert not at.exception, at.exception
    slider = at.select_slider(key="classify_history_step")
    assert list(slider.options) == ["0", "20"] and slider.value == 20
    assert any(m.value.startswith("**Verdict at step 20:**") and "**spam**" in m.value for m in at.markdown)
    slider.set_value(0).run()
    assert not at.exception and not at.error
    assert any(m.value.startswith("**Verdict at step 0:**") and "**ham**" in m.value for m in at.markdown)
    charts = {c.proto.id.rsplit("-", 1)[-1] for c in at.get("plotly_chart")}
    assert {"classify_history_losses", "classify_history_attention", "classify_history_map"} <= charts
    bars = next(c for c in at.get("plotly_chart") if c.proto.id.endswith("classify_history_losses"))
    figure = json.loads(bars.proto.spec)
    assert figure["layout"]["title"]["text"] == "P(spam) after each token"
    assert all(0 <= p <= 0.5 for p in figure["data"][0]["y"])  # the head's bias says ham at step 0


def test_expected_vs_yours_draws_the_reference_band_and_says_when_the_run_is_off_it(monkeypatch):
    """Issue 19 on page 5: a reference of the same start shape and recipe is drawn behind the
    curve, its source is named, and a run whose validation loss is above its band is told so."""
    from core.lab import references

    tokenizer = make_start_run()
    make_finished_classifier("spam-ref", tokenizer)  # validation loss 0.55 and 0.45 at steps 10 and 20
    monkeypatch.setitem(references.REFERENCES, "test-classify", {
        "stage": "classify", "band": 0.5, "match": {"model.n_embd": TINY["n_embd"], "model.n_layer": 1},
        "command": "python -m core classify --from base", "recipe": {}, "machine": "a test",
        "step": [10, 20], "train_loss": [0.3, 0.2], "val_loss": [0.2, 0.2]})
    at = page()
    assert not at.exception, at.exception
    assert any(c.value.startswith("Grey band: the reference run") and "python -m core classify" in c.value
               for c in at.caption)
    assert any("the reference run of this preset and recipe was at 0.200" in w.value for w in at.warning)
    loss = next(c for c in at.get("plotly_chart") if c.proto.id.endswith("classify_loss_chart"))
    assert json.loads(loss.proto.spec)["data"][0]["name"] == "expected"
    monkeypatch.delitem(references.REFERENCES, "test-classify")
    at.run()
    assert not any(c.value.startswith("Grey band") for c in at.caption)
    assert not any("reference run" in w.value for w in at.warning)
