"""Time to first token, tokens/s and 4-client throughput of `python -m core serve`, loopback only.

    python scripts/serve_bench.py                 # a tiny random model (GPT-2 vocabulary)
    python scripts/serve_bench.py --run smollm2-135m-instruct
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from core.gpt.config import preset_config  # noqa: E402
from core.gpt.model import GPT  # noqa: E402
from core.lab import serve  # noqa: E402
from core.lab.tokenizer_files import gpt2_tokenizer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--run", default=None, help="a run to serve (default: a tiny random model)")
parser.add_argument("--max-tokens", type=int, default=32)
parser.add_argument("--clients", type=int, default=4)
parser.add_argument("--requests-per-client", type=int, default=2)
parser.add_argument("--alone", type=int, default=3, help="single-client requests timed before the 4 clients")
args = parser.parse_args()
if args.run:
    engine = serve.Engine.from_run(args.run)
else:
    torch.manual_seed(0)
    tokenizer = gpt2_tokenizer()
    engine = serve.Engine("tiny-base", GPT(preset_config("base", tokenizer.vocab_size)).eval(), tokenizer)
print(json.dumps(serve.load_test(engine, clients=args.clients, max_tokens=args.max_tokens,
                                 requests_per_client=args.requests_per_client, alone_runs=args.alone)))
