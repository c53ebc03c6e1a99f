"""Stage 2 page: the worked example reacts to its controls; the trained-model part shows a run."""

import base64
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from tests.page_helpers import all_text, run_page

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "2_Attention.py")
HAVE_MODEL = importlib.util.find_spec("core.gpt.model") is not None


def page() -> AppTest:
    return run_page(PAGE)


def charts(at: AppTest) -> list:
    return at.get("plotly_chart")


def chart_json(at: AppTest, key_part: str) -> dict:
    """The figure of the chart whose element id mentions key_part."""
    for chart in charts(at):
        if key_part in chart.proto.id:
            return json.loads(chart.proto.spec)
    raise AssertionError(f"no chart with key {key_part!r}")


def z_of(trace: dict) -> list:
    """A heatmap's values; plotly sends numpy arrays as base64 'typed arrays'."""
    z = trace["z"]
    if isinstance(z, dict) and "bdata" in z:
        flat = np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"]))
        shape = [int(n) for n in str(z.get("shape", len(flat))).split(",")]
        return flat.reshape(shape).tolist()
    return z


def weights_z(at: AppTest, key_part: str) -> list:
    return z_of(chart_json(at, key_part)["data"][0])


def test_page_without_runs_shows_the_worked_example_and_the_note():
    at = page()
    text = all_text(at)
    assert "Attention by hand" in text
    assert "train a model on stage 4 first" in text
    # Embeddings, Q, K, V, scores, scaled, weights, context: one heatmap each.
    assert len(charts(at)) == 8
    weights = weights_z(at, "toy_weights")
    assert len(weights) == 6 and len(weights[0]) == 6
    assert sum(weights[0]) == pytest.approx(1.0, abs=1e-5)
    assert chart_json(at, "toy_weights")["layout"]["xaxis"]["ticktext"][0] == "Your"
    assert len(at.dataframe) >= 8


def test_controls_change_the_picture_live():
    at = page()
    before = weights_z(at, "toy_weights")
    at.slider(key="toy_seed").set_value(7).run()
    assert not at.exception
    assert weights_z(at, "toy_weights") != before

    at.toggle(key="toy_causal").set_value(True)
    at.slider(key="toy_heads").set_value(2)
    at.slider(key="toy_dhead").set_value(3)
    at.slider(key="toy_dropout").set_value(0.3)
    at.run()
    assert not at.exception, at.exception
    text = all_text(at)
    assert "Causal mask" in text and "1/√3" in text
    z = weights_z(at, "toy_weights")
    assert all(z[i][j] == 0 for i in range(6) for j in range(i + 1, 6))  # nothing above the diagonal
    assert len(weights_z(at, "toy_Q")[0]) == 3  # head dimension 3
    assert len(charts(at)) == 10  # + masked scores and dropout
    at.radio(key="toy_head").set_value(1).run()
    assert not at.exception
    assert weights_z(at, "toy_weights") != z  # the other head looks elsewhere


def test_one_score_checked_by_hand_matches_the_weights_table():
    from core.gpt.attention import attention_steps

    at = page()
    at.selectbox(key="toy_qi").set_value(2)
    at.selectbox(key="toy_kj").set_value(4)
    at.run()
    assert not at.exception
    expected = attention_steps(seed=0)
    shown = at.code[0].value
    assert f"= {expected['scaled'][0, 2, 4].item():.3f}" in shown
    assert shown.rstrip().endswith(f"= {expected['weights'][0, 2, 4].item():.3f}")


def test_unusable_text_gives_a_clear_error_not_a_traceback():
    at = page()
    at.text_input(key="toy_text").set_value("   ").run()
    assert not at.exception
    assert any("at least one word" in e.value for e in at.error)
    assert "train a model on stage 4 first" in all_text(at)  # the rest of the page still works


def make_model_run(run_id: str, n_layer=2, n_head=2, context=32):
    import torch

    from core.lab import runs
    from core.gpt.model import GPT, GPTConfig
    from core.lab.models import save_model_run
    from core.gpt.tokenizers import train_char

    torch.manual_seed(0)
    tokenizer = train_char("To be, or not to be, that is the question. <b>&")
    config = GPTConfig(vocab_size=tokenizer.vocab_size, context_length=context, n_embd=8,
                       n_head=n_head, n_layer=n_layer)
    runs.create_run(run_id, stage="pretrain", config={"note": "tiny test model"})
    save_model_run(run_id, GPT(config), tokenizer)


@pytest.mark.skipif(not HAVE_MODEL, reason="core/model.py (stage 3 helper) is not written yet")
def test_page_with_a_run_shows_the_grid_one_head_and_the_summary():
    make_model_run("tiny-attn")
    at = page()
    text = all_text(at)
    assert "train a model on stage 4 first" not in text
    assert "2 layers × 2 heads" in text
    grid = chart_json(at, "model_grid")
    assert len(grid["data"]) == 4  # layers × heads
    assert grid["layout"]["yaxis"]["ticktext"][0] == "T"  # token labels on the edge
    big = weights_z(at, "model_big")
    assert len(big) == 24  # "Tokens shown" default
    summary = at.dataframe[-1].value
    assert len(summary) == 4 and "mostly looks at" in summary.columns

    # User text with HTML in it: escaped in the labels, and the page still works.
    at.text_area(key="model_text").set_value("<b>to be</b> & not").run()
    assert not at.exception
    ticks = chart_json(at, "model_big")["layout"]["xaxis"]["ticktext"]
    assert ticks[0] == "&lt;" and "<" not in "".join(ticks)

    at.selectbox(key="model_layer").set_value(1)
    at.selectbox(key="model_head").set_value(1)
    at.run()
    assert not at.exception


@pytest.mark.skipif(not HAVE_MODEL, reason="core/model.py (stage 3 helper) is not written yet")
def test_big_models_show_a_choice_of_layers():
    make_model_run("deep-attn", n_layer=9, n_head=4, context=16)
    at = page()
    layers = at.multiselect(key="model_layers")
    assert layers.value == list(range(8))  # 8 layers × 4 heads = 32 small maps at most
    assert len(chart_json(at, "model_grid")["data"]) == 32
    layers.set_value([8]).run()
    assert not at.exception
    assert len(chart_json(at, "model_grid")["data"]) == 4


def test_rope_part_rotates_a_query_and_a_key_and_scores_depend_on_the_distance():
    at = page()
    assert "Rotary positions" in all_text(at)
    at.toggle(key="rope_show").set_value(True).run()
    assert not at.exception
    scores = np.array(weights_z(at, "rope_scores"))
    assert scores.shape == (12, 12)
    for d in range(-11, 12):  # every diagonal (same distance m - n) holds one value
        diagonal = np.diagonal(scores, offset=d)
        assert np.allclose(diagonal, diagonal[0], atol=1e-4)
    assert np.std([np.diagonal(scores, offset=d)[0] for d in range(12)]) > 0.01
    arrows = chart_json(at, "rope_arrows")["data"]
    assert [t["name"] for t in arrows] == ["q at position 0", "k at position 0", "q at position 5", "k at position 2"]
    length = lambda t: np.hypot(t["x"][1], t["y"][1])
    assert length(arrows[0]) == pytest.approx(length(arrows[2]), rel=1e-5)  # a rotation keeps the length
    assert f"{scores[5, 2]:.3f}" in all_text(at)
    at.slider(key="rope_m").set_value(9).run()
    at.slider(key="rope_n").set_value(6).run()
    assert not at.exception
    assert chart_json(at, "rope_arrows")["data"][2]["name"] == "q at position 9"
    assert f"{scores[9, 6]:.3f}" in all_text(at) and f"{scores[5, 2]:.3f}" in all_text(at)  # same distance 3
    names = [c.value for e in at.expander if "code behind" in e.label.lower() for c in e.caption]
    assert "`core.gpt.rope.apply_rope`" in names and "`core.gpt.rope.relative_position_scores`" in names
