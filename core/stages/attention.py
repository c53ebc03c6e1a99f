"""`python -m core attention --text T [--heads H] [--causal] [--seed S] [--dim D]` — stage 2 alone.

Runs the worked example of core/attention.py on your text (split into words, embedded with a
seeded random table) and prints every step — Q, K, V, scores, scaled scores, weights, context — on
stderr, one small table per head. The JSON last line on stdout holds `tokens` (the words) and
`weights` (nested lists, shape heads × tokens × tokens; row i = where word i looks).
"""

import sys

from core.gpt.attention import EXAMPLE_SENTENCE, attention_entropy, attention_steps


def add_arguments(parser):
    parser.add_argument("--text", default=EXAMPLE_SENTENCE,
                        help=f'a short sentence, split on spaces (default: "{EXAMPLE_SENTENCE}")')
    parser.add_argument("--heads", type=int, default=1, help="number of attention heads (default 1)")
    parser.add_argument("--causal", action="store_true", help="hide future words (as a GPT does)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random embeddings and weights")
    parser.add_argument("--dim", type=int, default=4,
                        help="head dimension d: the length of each query, key and value vector (default 4)")
    parser.add_argument("--embed-dim", type=int, default=4, help="length of each word's embedding (default 4)")
    parser.add_argument("--dropout", type=float, default=0.0, help="attention dropout probability (default 0)")


def format_matrix(title, matrix, row_labels, col_labels, digits=2) -> str:
    """A small labelled table of numbers, for reading in a terminal."""
    width = max(digits + 5, *(len(c) for c in col_labels))
    label_width = max(len(r) for r in row_labels)
    lines = [title, " " * label_width + " " + " ".join(c.rjust(width) for c in col_labels)]
    for label, row in zip(row_labels, matrix.tolist()):
        cells = " ".join(f"{x:{width}.{digits}f}" if x != float("-inf") else "-inf".rjust(width) for x in row)
        lines.append(label.rjust(label_width) + " " + cells)
    return "\n".join(lines)


def run(args) -> dict:
    steps = attention_steps(args.text, seed=args.seed, d_model=args.embed_dim, d_head=args.dim,
                            n_heads=args.heads, causal=args.causal, dropout_p=args.dropout)
    tokens = steps["tokens"]
    dims = [f"d{i}" for i in range(args.dim)]

    def show(text=""):
        print(text, file=sys.stderr)

    show(f"tokens: {tokens}")
    show(format_matrix("X: word embeddings (random, seeded)", steps["X"], tokens,
                       [f"e{i}" for i in range(args.embed_dim)]))
    for h in range(args.heads):
        show(f"\n=== head {h} ===")
        show(format_matrix("Q = X @ W_q (what each word is looking for)", steps["Q"][h], tokens, dims))
        show(format_matrix("K = X @ W_k (what each word offers)", steps["K"][h], tokens, dims))
        show(format_matrix("V = X @ W_v (what each word passes on)", steps["V"][h], tokens, dims))
        show(format_matrix("scores = Q @ K^T", steps["scores"][h], tokens, tokens))
        show(format_matrix(f"scaled scores = scores * 1/sqrt({args.dim}) = scores * {steps['scale']:.3f}"
                           + (" (future masked to -inf)" if args.causal else ""),
                           steps["masked"][h], tokens, tokens))
        show(format_matrix("weights = softmax(scaled scores), each row sums to 1",
                           steps["weights"][h], tokens, tokens, digits=3))
        if args.dropout > 0:
            show(format_matrix(f"weights after dropout p={args.dropout}", steps["dropped"][h], tokens, tokens, 3))
        show(format_matrix("context = weights @ V", steps["context"][h], tokens, dims))

    entropy = attention_entropy(steps["weights"]).mean(-1)  # (H,) mean bits per head
    return {
        "tokens": tokens,
        "weights": [[[round(x, 4) for x in row] for row in head] for head in steps["weights"].tolist()],
        "heads": args.heads,
        "head_dim": args.dim,
        "causal": bool(args.causal),
        "seed": args.seed,
        "entropy_bits": [round(x, 4) for x in entropy.tolist()],
    }
