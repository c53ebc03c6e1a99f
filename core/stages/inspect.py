"""`python -m core inspect`: stage 3 on its own — a model's parameter budget and forward trace.

    python -m core inspect --preset small --vocab-size 65
    python -m core inspect --run my-pretrain-run --text "To be, or not"

Prints the trace (every module's output shape, in order) on stderr and, as the last line of
stdout, JSON with `parameters`, `layers`, `shapes` (module -> output shape), the per-component
`breakdown`, fp32 `bytes` for the weights and `flops_per_token`.
"""

from __future__ import annotations

import sys

from core.gpt.errors import GlassBoxError

BIG_MODEL = 20_000_000  # above this many parameters, trace shapes on the meta device (no memory)


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a preset: tiny, small, base, gpt2-124m, gpt2-355m")
    source.add_argument("--run", help="a run that holds a model")
    parser.add_argument("--vocab-size", type=int, default=None,
                        help="vocabulary size for --preset (default: 50257 for GPT-2 presets, else 256)")
    parser.add_argument("--text", default=None, help="input to trace (--run only: needs the run's tokenizer)")
    parser.add_argument("--tokens", type=int, default=8, help="length of the traced input when no --text (default 8)")


def inspect_model(config, model=None, ids: list[int] | None = None, n_tokens: int = 8) -> dict:
    """Parameter budget and forward trace of `model` (or of a fresh model built from `config`)."""
    import torch

    from core.gpt.model import GPT, count_parameters, memory_bytes

    breakdown = count_parameters(config)
    total = sum(breakdown.values())
    if model is None:
        # A big preset is traced on the meta device: shapes without allocating any weights.
        device = "meta" if total > BIG_MODEL else "cpu"
        with torch.device(device):
            model = GPT(config)
    device = next(model.parameters()).device
    if ids is None:
        ids = [i % config.vocab_size for i in range(max(1, min(n_tokens, config.context_length)))]
    if len(ids) > config.context_length:
        raise GlassBoxError(f"The input has {len(ids)} tokens; the model's context holds {config.context_length}.")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    trace = model.forward_trace(idx)
    return {
        "parameters": total,
        "layers": config.n_layer,
        "shapes": {row["module"]: row["output_shape"] for row in trace},
        "breakdown": breakdown,
        "bytes": memory_bytes(total),
        "flops_per_token": model.flops_per_token(),
        "config": config.to_dict(),
        "trace": trace,
    }


def run(args) -> dict:
    from core.gpt.model import PRESETS, preset_config
    from core.lab.models import load_model_run

    if args.preset:
        vocab = args.vocab_size or PRESETS.get(args.preset, {}).get("vocab_size", 256)
        config = preset_config(args.preset, vocab)
        if args.text:
            raise GlassBoxError("--text needs --run (a preset has no tokenizer); use --tokens N instead.")
        report = inspect_model(config, n_tokens=args.tokens)
    else:
        model, tokenizer, _ = load_model_run(args.run)
        ids = tokenizer.encode(args.text)[-model.config.context_length:] if args.text else None
        if args.text is not None and not ids:
            raise GlassBoxError("The text encodes to no tokens: give a few characters.")
        report = inspect_model(model.config, model=model, ids=ids, n_tokens=args.tokens)
    for row in report.pop("trace"):
        shape = "×".join(str(d) for d in row["output_shape"] or [])
        print(f"{'  ' * row['depth']}{row['module']:<{28 - 2 * row['depth']}} {row['kind']:<20} "
              f"{shape:<16} {row['parameters']:>12,}", file=sys.stderr)
    print(f"{report['parameters']:,} parameters, {report['bytes'] / 2**20:.1f} MiB in fp32", file=sys.stderr)
    return report
