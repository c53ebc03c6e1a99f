"""`python -m core judge`: stage 7 on its own — an LLM judge scores the answers.

    OPENAI_API_KEY=... python -m core judge --run my-instruct \
        --base-url http://localhost:11434/v1 --model llama3.2 --run-id my-judge [--resume]
    python -m core judge --data eval-example-data --base-url URL --model NAME --limit 20 --run-id ID

The key comes only from the environment (`OPENAI_API_KEY`; any value for a local server), never
from the command line, where it would land in shell history and process lists. Results go into
`checkpoints/<run-id>/judgements.jsonl` and `summary.json`; the JSON last line holds n,
mean_score, ci95, failed, pairwise_win_rate and cached (judgements answered from the cache).
"""

import os
import sys

from core.lab.errors import JudgeError


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="a stage-6 (instruct) run whose responses.json to judge")
    source.add_argument("--data", help="a registry data set with model answers: "
                                       "instruction-data-with-response or eval-example-data")
    parser.add_argument("--base-url", required=True,
                        help="OpenAI-compatible endpoint, e.g. http://localhost:11434/v1 (Ollama)")
    parser.add_argument("--model", required=True, help="judge model name as the endpoint knows it")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per request (default 60)")
    parser.add_argument("--limit", type=int, default=None, help="judge only the first N instructions")
    parser.add_argument("--concurrency", type=int, default=2, help="requests in flight (default 2)")
    parser.add_argument("--mode", choices=["single", "pairwise", "both"], default="both",
                        help="grade each answer, compare the two models, or both (default)")
    parser.add_argument("--rubric", default="instruction-v1", help="rubric version (core/rubrics/)")
    parser.add_argument("--max-attempts", type=int, default=4,
                        help="tries per request on 429, 5xx and timeouts (default 4)")
    parser.add_argument("--backoff", type=float, default=1.0,
                        help="first wait in seconds between retries; doubles each time (default 1)")
    parser.add_argument("--run-id", default=None, help="id of the judge run (default judge-<time>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted run: finished judgements come from the cache")


def run(args) -> dict:
    from core.gpt import judge
    from core.lab import runs

    run_id = runs.validate_run_id(args.run_id) if args.run_id else runs.new_run_id("judge")
    if args.run:
        runs.validate_run_id(args.run)
    if args.max_attempts < 1 or args.backoff < 0:
        raise JudgeError("--max-attempts must be at least 1 and --backoff not negative.")
    settings = judge.EndpointSettings(
        base_url=args.base_url, model=args.model, api_key=os.environ.get("OPENAI_API_KEY", ""),
        timeout=args.timeout, max_concurrency=args.concurrency, max_attempts=args.max_attempts,
        backoff_s=args.backoff)

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    return judge.judge_run(run_id, settings, source_run=args.run, data=args.data, mode=args.mode,
                           limit=args.limit, rubric_version=args.rubric, resume=args.resume,
                           progress=progress)
