"""The teacher's views (core/lab/classroom.py): progress per learner, leaderboards, report cards.

Every run here is written straight into the run store as the stages leave it (config.json,
status.json with its `result`, metrics.jsonl, owner.json), so each test checks concrete figures.
"""

import datetime as dt
import re
import subprocess

import pytest

from core.lab import classroom, learners, runs

DAY = dt.date(2025, 3, 14)


def make_run(run_id, stage, owner=None, state="finished", result=None, config=None, metrics=(), **status):
    """A run as a stage leaves it; `result` goes into status.json as a job's runner writes it."""
    run = runs.create_run(run_id, stage, config or {})
    learners.set_owner(run_id, owner)
    for record in metrics:
        runs.append_jsonl(run.path / "metrics.jsonl", record)
    fields = {"result": result} if result is not None else {}
    runs.write_status(run_id, state, **fields, **status)
    return runs.open_run(run_id)


def pretrain_config(preset="small", minutes=5.0, data="python-docs"):
    return {"preset": preset, "data": data, "train": {"max_minutes": minutes, "max_steps": None}}


def entries(row, number):
    return [(e["run_id"], e["state"], e["label"], e["value"]) for e in row["stages"][number]]


def points_of(svg_or_html, css):
    found = re.search(rf'<polyline class="{css}"[^>]* points="([^"]*)"', svg_or_html)
    assert found, f"no {css} polyline"
    return [tuple(float(v) for v in p.split(",")) for p in found.group(1).split()]


# ---------------------------------------------------------------------------- columns and figures


def test_the_seven_columns_hold_every_run_stage_once():
    assert [n for n, _, _ in classroom.STAGE_COLUMNS] == [1, 2, 3, 4, 5, 6, 7]
    placed = [s for _, _, stages in classroom.STAGE_COLUMNS for s in stages]
    assert sorted(placed) == sorted(runs.STAGES)
    assert dict((n, s) for n, _, s in classroom.STAGE_COLUMNS)[2] == ()
    assert dict((n, s) for n, _, s in classroom.STAGE_COLUMNS)[6] == ("instruct", "prefer")


def test_the_file_names_agree_with_the_stages_that_write_them():
    from core.stages import classify, instruct, judge  # imports torch: only this test needs the stages

    assert classroom.CLASSIFY_RESULTS_FILE == classify.RESULTS_FILE
    assert classroom.JUDGE_SUMMARY_FILE == judge.SUMMARY_FILE
    assert classroom.INSTRUCT_RATES_FILE == instruct.FORMAT_RATES_FILE


def test_each_stage_has_its_headline_figure():
    assert classroom.headline(make_run("tok", "tokenizer", config={"vocab_size": 1000})) == ("vocabulary", 1000)
    pre = make_run("pre", "pretrain", result={"val_loss": 3.91, "train_loss": 3.7, "steps": 500, "seconds": 60.0},
                   metrics=[{"step": 500, "train_loss": 3.8, "val_loss": 4.5}])
    assert classroom.headline(pre) == ("val loss", 3.91)  # the result, not the last metric
    assert classroom.headline(make_run("cls", "classify", result={"test_accuracy": 0.97})) == ("test accuracy", 0.97)
    ins = make_run("ins", "instruct", result={"format_rate_tuned": 1.0, "val_loss": 0.8})
    assert classroom.headline(ins) == ("format-following", 1.0)
    jud = make_run("jud", "judge", result={"mean_score": 3.4, "ci95": 0.3, "n": 50})
    assert classroom.headline(jud) == ("judge mean", 3.4)
    assert classroom.headline(make_run("dpo", "prefer", result={"reward_accuracy": 0.8})) == ("reward accuracy", 0.8)


def test_an_import_counts_the_parameters_in_its_weights_header():
    import torch  # heavy: only this test writes real weights

    with runs.quick_run("gpt2-import", "import", {"architecture": "gpt2"}) as run:
        tensors = {"wte.weight": torch.zeros(10, 4), "h.0.attn.weight": torch.zeros(4, 3), "ln.bias": torch.zeros(4)}
        runs.save_tensors(run.path / "model.safetensors", tensors)
    assert classroom.headline(runs.open_run("gpt2-import")) == ("parameters", 40 + 12 + 4)
    with runs.quick_run("no-weights", "import", {}):
        pass
    assert classroom.headline(runs.open_run("no-weights")) == ("parameters", None)


def test_an_unfinished_run_shows_its_last_metric_or_nothing():
    training = make_run("pre-live", "pretrain", state="running", metrics=[
        {"step": 10, "train_loss": 5.0, "val_loss": 5.1}, {"step": 20, "train_loss": 4.0},
        {"step": 30, "train_loss": 3.5, "val_loss": 3.6}, {"step": 40, "train_loss": 3.2}])
    assert classroom.headline(training) == ("val loss", 3.6)  # the newest evaluation
    early = make_run("pre-early", "pretrain", state="running", metrics=[{"step": 1, "train_loss": 6.25}])
    assert classroom.headline(early) == ("train loss", 6.25)
    # A resumed run keeps its last session's result in status.json while it trains again.
    resumed = make_run("pre-resumed", "pretrain", state="running", result={"val_loss": 9.0},
                       metrics=[{"step": 100, "train_loss": 2.0, "val_loss": 2.2}])
    assert classroom.headline(resumed) == ("val loss", 2.2)
    failed = make_run("cls-failed", "classify", state="failed", error="boom",
                      metrics=[{"step": 50, "train_loss": 0.4, "val_loss": 0.3, "val_accuracy": 0.91}])
    assert classroom.headline(failed) == ("val accuracy", 0.91)
    assert classroom.headline(make_run("jud-failed", "judge", state="failed")) == ("judge mean", None)


def test_a_run_made_outside_a_job_reads_the_stage_files():
    cls = make_run("cls-cli", "classify")  # a terminal run: finished, no `result` in status.json
    runs.write_json_atomic(cls.path / classroom.CLASSIFY_RESULTS_FILE, {"test_accuracy": 0.955, "val_accuracy": 0.96})
    assert classroom.headline(runs.open_run("cls-cli")) == ("test accuracy", 0.955)
    jud = make_run("jud-cli", "judge")
    runs.write_json_atomic(jud.path / classroom.JUDGE_SUMMARY_FILE, {"mean_score": 2.75, "n": 8})
    assert classroom.headline(runs.open_run("jud-cli")) == ("judge mean", 2.75)
    ins = make_run("ins-cli", "instruct")
    runs.write_json_atomic(ins.path / classroom.INSTRUCT_RATES_FILE, {"start": 0.0, "tuned": 0.85})
    assert classroom.headline(runs.open_run("ins-cli")) == ("format-following", 0.85)
    pre = make_run("pre-cli", "pretrain",
                   metrics=[{"step": 1, "val_loss": 6.0}, {"step": 9, "train_loss": 2.0, "val_loss": 2.5}])
    assert classroom.headline(pre) == ("val loss", 2.5)


@pytest.mark.parametrize("label, value, text", [("test accuracy", 0.97, "97.0%"), ("val loss", 3.91234, "3.912"),
                                                ("vocabulary", 1000, "1,000"), ("judge mean", 3.4, "3.40"),
                                                ("parameters", 124439808, "124,439,808"), ("val loss", None, "—")])
def test_figures_read_as_a_person_reads_them(label, value, text):
    assert classroom.format_value(label, value) == text


# ---------------------------------------------------------------------------- progress


def test_progress_has_one_row_per_learner_with_their_runs_by_stage():
    make_run("bob-tok", "tokenizer", "bob", config={"vocab_size": 512})
    make_run("alice-tok", "tokenizer", "alice", config={"vocab_size": 1000})
    make_run("alice-pre", "pretrain", "alice", result={"val_loss": 3.91})
    make_run("alice-cls", "classify", "alice", state="running", metrics=[{"step": 5, "val_accuracy": 0.8}])
    make_run("alice-dpo", "prefer", "alice", result={"reward_accuracy": 0.75})
    make_run("teacher-jud", "judge", None, result={"mean_score": 4.2})

    rows = classroom.progress()
    assert [r["name"] for r in rows] == ["alice", "bob", "shared"]
    alice, bob, shared = rows
    assert alice["learner"] == "alice" and shared["learner"] is None
    assert entries(alice, 1) == [("alice-tok", "finished", "vocabulary", 1000)]
    assert entries(alice, 2) == [] and entries(alice, 3) == []
    assert entries(alice, 4) == [("alice-pre", "finished", "val loss", 3.91)]
    assert entries(alice, 5) == [("alice-cls", "running", "val accuracy", 0.8)]
    assert entries(alice, 6) == [("alice-dpo", "finished", "reward accuracy", 0.75)]
    assert (alice["runs"], alice["reached"], alice["running"], alice["queued"], alice["active_jobs"]) == (4, 6, 1, 0, 1)
    assert entries(bob, 1) == [("bob-tok", "finished", "vocabulary", 512)]
    assert (bob["runs"], bob["reached"], bob["active_jobs"]) == (1, 1, 0)
    assert entries(shared, 7) == [("teacher-jud", "finished", "judge mean", 4.2)]


def test_progress_counts_queued_jobs_and_reports_a_dead_job_as_failed():
    make_run("carol-q", "pretrain", "carol", state="queued")
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid now names no process: the job died without saying how it ended
    make_run("carol-dead", "pretrain", "carol", state="running", pid=dead.pid,
             metrics=[{"step": 3, "train_loss": 4.5}])
    (carol,) = classroom.progress()
    assert sorted(entries(carol, 4)) == [("carol-dead", "failed", "train loss", 4.5),
                                         ("carol-q", "queued", "val loss", None)]
    assert (carol["running"], carol["queued"], carol["active_jobs"], carol["reached"]) == (0, 1, 1, 0)


def test_progress_skips_a_damaged_run_and_is_empty_with_no_runs():
    assert classroom.progress() == []
    broken = runs.checkpoints_dir() / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    make_run("dan-tok", "tokenizer", "dan", config={"vocab_size": 65})
    assert [(r["name"], r["runs"]) for r in classroom.progress()] == [("dan", 1)]


# ---------------------------------------------------------------------------- leaderboard


def test_the_pretraining_board_compares_only_equal_budgets_of_the_small_preset():
    make_run("alice-5", "pretrain", "alice", config=pretrain_config(), result={"val_loss": 2.1})
    make_run("bob-5", "pretrain", "bob", config=pretrain_config(minutes=5.04), result={"val_loss": 1.9})  # within 1 %
    make_run("frank-5", "pretrain", "frank", config=pretrain_config(), result={"val_loss": 2.1})
    make_run("shared-5", "pretrain", None, config=pretrain_config(minutes=4.96), result={"val_loss": 2.4})
    make_run("carol-10", "pretrain", "carol", config=pretrain_config(minutes=10), result={"val_loss": 1.5})
    make_run("dave-6", "pretrain", "dave", config=pretrain_config(minutes=5.06), result={"val_loss": 1.4})  # 1.2 % off
    make_run("dave-tiny", "pretrain", "dave", config=pretrain_config(preset="tiny"), result={"val_loss": 1.0})
    make_run("erin-live", "pretrain", "erin", config=pretrain_config(), state="running",
             metrics=[{"step": 10, "train_loss": 0.6, "val_loss": 0.5}])
    make_run("erin-stop", "pretrain", "erin", config=pretrain_config(), state="stopped", result={"val_loss": 0.4})
    make_run("gail-none", "pretrain", "gail", config=pretrain_config(), result={"val_loss": None})
    runs.update_config("frank-5", created="2025-01-01T09:00:00")  # the earlier of two equal losses
    runs.update_config("alice-5", created="2025-01-01T10:00:00")

    board = classroom.leaderboard(5)["pretrain"]
    assert [(r["rank"], r["owner"], r["run_id"], r["value"]) for r in board] == [
        (1, "bob", "bob-5", 1.9), (2, "frank", "frank-5", 2.1), (2, "alice", "alice-5", 2.1),
        (4, "shared", "shared-5", 2.4)]
    assert [r["run_id"] for r in classroom.leaderboard(10)["pretrain"]] == ["carol-10"]
    assert classroom.leaderboard(7)["pretrain"] == []


def test_the_classifier_and_judge_boards_rank_highest_first():
    make_run("alice-cls", "classify", "alice", result={"test_accuracy": 0.97})
    make_run("bob-cls", "classify", "bob", result={"test_accuracy": 0.985})
    make_run("ref-cls", "classify", None, result={"test_accuracy": 0.95})
    make_run("carol-cls", "classify", "carol", state="running", metrics=[{"step": 5, "val_accuracy": 0.999}])
    make_run("dave-cls", "classify", "dave", state="failed", result={"test_accuracy": 1.0})
    make_run("alice-jud", "judge", "alice", result={"mean_score": 3.4, "ci95": 0.2, "n": 50})
    make_run("bob-jud", "judge", "bob", result={"mean_score": 4.1, "ci95": 0.3, "n": 50})
    make_run("erin-jud", "judge", "erin", result={"mean_score": None, "n": 0})

    boards = classroom.leaderboard(5)
    assert set(boards) == {"pretrain", "classify", "judge"}
    assert [(r["rank"], r["owner"], r["run_id"], r["value"]) for r in boards["classify"]] == [
        (1, "bob", "bob-cls", 0.985), (2, "alice", "alice-cls", 0.97), (3, "shared", "ref-cls", 0.95)]
    assert [(r["rank"], r["owner"], r["value"]) for r in boards["judge"]] == [(1, "bob", 4.1), (2, "alice", 3.4)]
    assert boards["pretrain"] == []


@pytest.mark.parametrize("minutes", [0, -5, float("nan"), "5"])
def test_a_leaderboard_needs_a_real_budget(minutes):
    with pytest.raises(classroom.ClassroomError, match="minutes above 0"):
        classroom.leaderboard(minutes)


# ---------------------------------------------------------------------------- report card


def test_downsample_keeps_the_ends_and_at_most_the_limit():
    assert classroom.downsample(list(range(150))) == list(range(150))
    thinned = classroom.downsample(list(range(1000)))
    assert len(thinned) == 200 and thinned[0] == 0 and thinned[-1] == 999
    assert thinned == sorted(set(thinned))  # no point twice, order kept
    assert classroom.downsample(list(range(201))) == [round(i * 200 / 199) for i in range(200)]


def test_a_loss_chart_draws_train_and_val_curves_inside_its_axes():
    metrics = [{"step": s, "train_loss": 10.0 - s / 100} for s in range(1, 451)]
    metrics += [{"step": s, "val_loss": 9.0 - s / 100} for s in range(50, 451, 50)]
    svg = classroom.loss_chart_svg(metrics)
    train, val = points_of(svg, "train"), points_of(svg, "val")
    assert (len(train), len(val)) == (200, 9)
    assert train[0] == (52.0, 12.0)  # step 1 at the left edge, the highest loss at the top
    assert train[-1][0] == 468.0 and val[-1][0] == 468.0  # step 450 at the right edge
    assert max(y for _, y in train + val) == 166.0  # the lowest loss (val, 4.5) on the x axis
    assert ">train loss<" in svg and ">val loss<" in svg and ">step<" in svg and ">450<" in svg
    only_train = classroom.loss_chart_svg(metrics[:3])
    assert 'class="train"' in only_train and 'class="val"' not in only_train
    assert classroom.loss_chart_svg([{"step": 1, "lr": 0.1}]) == ""


def test_the_report_card_shows_one_learners_runs_figures_and_charts():
    make_run("alice-tok", "tokenizer", "alice", config={"vocab_size": 1000})
    pre_metrics = [{"step": s, "train_loss": 8.0 - s / 100} for s in range(1, 451)]
    pre_metrics += [{"step": s, "val_loss": 7.5 - s / 100} for s in range(45, 451, 45)]
    make_run("alice-pre", "pretrain", "alice", config=pretrain_config(data="<b>my-corpus</b>"),
             result={"val_loss": 1.234, "train_loss": 1.1, "steps": 450, "seconds": 300.0}, metrics=pre_metrics)
    make_run("alice-cls", "classify", "alice", result={"test_accuracy": 0.97},
             metrics=[{"step": 1, "train_loss": 0.7}, {"step": 2, "train_loss": 0.5}, {"step": 3, "train_loss": 0.3}])
    make_run("alice-ins", "instruct", "alice", state="failed", error="<script>alert('pwned')</script> out of memory")
    make_run("bob-secret", "pretrain", "bob", config=pretrain_config(), result={"val_loss": 0.5},
             metrics=[{"step": 1, "train_loss": 1.0}])
    make_run("teacher-tok", "tokenizer", None, config={"vocab_size": 50257})

    page = classroom.report_card("alice", today=DAY)
    assert page.startswith("<!DOCTYPE html>")
    assert "<title>Glass Box LLM — alice — 2025-03-14</title>" in page and "Report card: alice" in page
    for run_id in ("alice-tok", "alice-pre", "alice-cls", "alice-ins"):
        assert f"<code>{run_id}</code>" in page
    assert "vocabulary: 1,000" in page and "val loss: 1.234" in page and "test accuracy: 97.0%" in page
    assert "format-following: —" in page and "budget 5.0 min" in page and "4 runs" in page
    assert "bob-secret" not in page and "teacher-tok" not in page and "50,257" not in page
    # Charts for the runs that trained with metrics: pretrain (downsampled) and classify.
    assert page.count("<svg") == 2 and "No metrics logged yet." in page  # the failed instruct run has none
    assert (len(points_of(page, "train")), len(points_of(page, "val"))) == (200, 10)
    # What a learner typed is shown as text, never run; the page reaches nothing outside itself.
    assert "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt; out of memory" in page
    assert "&lt;b&gt;my-corpus&lt;/b&gt;" in page and "<b>" not in page
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert "@media print" in page and "@page" in page
    # Every stage has its section, in order; stage 2 says why it is empty.
    assert [int(n) for n in re.findall(r"<h2>(\d)\. ", page)] == [1, 2, 3, 4, 5, 6, 7]
    assert "keeps no runs" in page


def test_the_shared_report_card_and_an_odd_owner_name():
    make_run("teacher-tok", "tokenizer", None, config={"vocab_size": 50257})
    make_run("alice-tok", "tokenizer", "alice", config={"vocab_size": 1000})
    shared = classroom.report_card(None, today=DAY)
    assert "<code>teacher-tok</code>" in shared and "vocabulary: 50,257" in shared and "alice-tok" not in shared
    assert "Report card: shared" in shared and "1 run<" in shared
    # owner.json copied in from elsewhere may hold anything: the name is escaped, too.
    run = make_run("odd", "tokenizer", config={"vocab_size": 7})
    runs.write_json_atomic(run.path / runs.OWNER_FILE, {"owner": "<img src=x onerror=alert(1)>"})
    odd = classroom.report_card("<img src=x onerror=alert(1)>", today=DAY)
    assert "<code>odd</code>" in odd and "<img" not in odd and "&lt;img src=x onerror=alert(1)&gt;" in odd
    assert classroom.progress()[0]["name"] == "<img src=x onerror=alert(1)>"  # raw data; the page escapes


def test_the_report_file_is_named_after_the_learner_and_the_date():
    assert classroom.report_filename("alice", today=DAY) == "glassbox-report-alice-2025-03-14.html"
    assert classroom.report_filename(None, today=DAY) == "glassbox-report-shared-2025-03-14.html"
    assert classroom.report_filename("../../etc/x", today=DAY) == "glassbox-report-etc-x-2025-03-14.html"
