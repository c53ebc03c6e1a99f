"""`python -m core bench`: every piece runs on tiny sizes and returns sane figures.

No timing thresholds here (the machine is shared; speed targets live in the benchmark's own
table): only that the JSON has its keys and the figures are positive and finite.
"""

import json
import math

import pytest

from core.lab import bench
from core.__main__ import main, run_command
from core.gpt.errors import GlassBoxError

QUICK_KEYS = ["matmul_gflops", "mfu_tiny", "mfu_small", "tokens_per_s_tiny", "tokens_per_s_small",
              "fast_vs_teaching", "kv_cache_speedup", "bpe_train_s"]


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_quick_bench_reports_every_figure_positive(shared_data):
    result = run_command(["bench", "--quick", "--only",
                          "matmul,tiny,small,fast_vs_teaching,kv_cache,bpe"])
    for key in QUICK_KEYS:
        assert positive_finite(result[key]), (key, result[key])
    assert result["device"] in ("cpu", "cuda", "mps")
    assert result["kv_cache_identical"] is True  # the cache changes speed, never the tokens
    assert 0 < result["mfu_small"] < 1.5  # a fraction of the peak (noise may push it a bit over 1)
    json.dumps(result)  # the dict becomes the JSON last line


def test_training_speed_counts_flops_and_mfu():
    figures = bench.training_speed("tiny", peak_gflops=100.0, warmup=1, min_steps=2, min_seconds=0.0,
                                   batch_size=2)
    assert figures["steps"] == 2 and figures["batch_size"] == 2 and figures["context_length"] == 64
    assert figures["flops_per_token"] > 6 * 60_000  # 6N for the non-embedding weights, plus attention
    assert positive_finite(figures["tokens_per_s"])
    assert figures["mfu"] == pytest.approx(figures["model_gflops"] / 100.0)


def test_matmul_peak_is_positive():
    figures = bench.matmul_gflops(sizes=(64, 128), repeats=1, device="cpu")
    assert positive_finite(figures["matmul_gflops"])
    assert set(figures["matmul_by_size"]) == {64, 128}
    assert figures["matmul_dtype"] == "float32"


def test_bpe_piece_skips_with_a_note_when_the_corpus_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("GLASSBOX_DATA_DIR", str(tmp_path))  # empty: no Tiny Shakespeare here
    figures = bench.bpe_train_s()
    assert figures["bpe_train_s"] is None
    assert "skipped" in figures["bpe_note"]


def test_first_point_starts_a_real_job_and_cleans_up(isolated_workspace):
    figures = bench.first_point_s(preset="tiny", data_name="python-docs", timeout_s=120)
    assert positive_finite(figures["first_point_s"]), figures
    assert "first_point_note" not in figures
    # the job ran in its own temporary run store, not in the test's
    assert not any(isolated_workspace["checkpoints"].iterdir())


def test_unknown_piece_is_a_user_error():
    with pytest.raises(GlassBoxError, match="Unknown bench piece"):
        run_command(["bench", "--only", "warp-drive"])


def test_cli_prints_the_table_and_json_last_line(capsys):
    assert main(["bench", "--quick", "--only", "kv_cache"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert positive_finite(result["kv_cache_speedup"])
    assert "kv_cache_speedup" in err and "≥ 5" in err  # the table with its target


def test_the_int8_piece_measures_decoding_against_its_ceiling():
    from core.lab.bench_int8 import int8_decode

    figures = int8_decode(quick=True)
    for key in ("int8_decode_tokens_per_s", "int8_linears_tokens_per_s", "fp32_decode_tokens_per_s",
                "fp32_linears_tokens_per_s"):
        assert positive_finite(figures[key]), (key, figures[key])
    # int8 stores a quarter of fp32's bytes (per-row scales aside)
    assert figures["int8_weight_mb"] * 4 == pytest.approx(figures["fp32_weight_mb"], rel=0.01)
    assert figures["int8_overhead_share"] < 1
