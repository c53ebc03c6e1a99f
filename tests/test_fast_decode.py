"""The fast decoding twin (core/lab/fast_decode.py) against the textbook's cached step."""

import pytest
import torch

from core.gpt.generate import KVCache
from core.gpt.model import GPT, GPTConfig
from core.lab import fast_decode, quantize

BLOCKS = {
    "gpt2": dict(position="learned", norm="layernorm", mlp="gelu", n_kv_head=None, bias=True),
    "modern": dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=2, bias=False),
    "modern-mha": dict(position="rope", norm="rmsnorm", mlp="swiglu", n_kv_head=4, bias=False),
}


def tiny(block: str) -> GPT:
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=97, context_length=32, n_embd=32, n_head=4, n_layer=2, **BLOCKS[block])
    return GPT(config).eval()


def variants(model: GPT, ids: list[int]) -> dict:
    return {"fp32": model, "int8-smooth": quantize.int8_model(model, "smooth", ids),
            "int8-dynamic": quantize.int8_model(model, "dynamic")}


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_each_step_gives_the_textbook_steps_logits(block):
    model = tiny(block)
    ids = torch.randint(97, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    for name, variant in variants(model, ids).items():
        with torch.inference_mode():
            textbook, twin = (KVCache(variant.config, 1, "cpu", torch.float32) for _ in range(2))
            variant._last_logits(torch.tensor([ids[:5]]), textbook)
            variant._last_logits(torch.tensor([ids[:5]]), twin)
            decoder = fast_decode.FastDecoder(variant)
            for token in ids[5:]:
                expected = variant._last_logits(torch.tensor([[token]]), textbook)
                got = decoder.step(token, twin)
                assert got.shape == expected.shape == (1, 97)
                assert torch.allclose(got, expected, atol=1e-5, rtol=1e-5), (name, token)
            assert twin.length == textbook.length == len(ids)
            for layer in range(2):
                assert torch.allclose(twin.keys[layer][:, :, :len(ids)], textbook.keys[layer][:, :, :len(ids)],
                                      atol=1e-6)


@pytest.mark.parametrize("block", ["gpt2", "modern"])
def test_generation_gives_the_textbooks_tokens(block):
    model = tiny(block)
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    for sampling in (dict(temperature=0), dict(temperature=0.8, top_k=20)):
        expected = model.generate(prompt, 12, generator=torch.Generator().manual_seed(5), **sampling)
        got = fast_decode.generate(model, prompt, 12, generator=torch.Generator().manual_seed(5), **sampling)
        assert got.tolist() == expected.tolist()
    # an end token stops both at the same place, and it is kept
    greedy = model.generate(prompt, 12, temperature=0)
    eos = int(greedy[0, 8])
    stopped = fast_decode.generate(model, prompt, 12, temperature=0, eos_id=eos)
    assert stopped.tolist() == model.generate(prompt, 12, temperature=0, eos_id=eos).tolist()
    assert stopped[0, -1].item() == eos


def test_past_the_context_it_falls_back_to_the_sliding_window():
    model = tiny("modern")
    prompt = torch.arange(30).unsqueeze(0) % 97
    got = fast_decode.generate(model, prompt, 6, temperature=0)
    assert got.shape == (1, 36)
    assert got.tolist() == model.generate(prompt, 6, temperature=0).tolist()
