"""`python -m core job --run-id ID` (internal): the body of a background job, see core/lab/jobs.py.

The dispatcher hands its own `run_command` down as `args.dispatch`: the job runs the stored command
in this process.
"""

import sys

from core.lab import jobs


def add_arguments(parser):
    parser.add_argument("--run-id", required=True)


def run(args) -> dict:
    code = jobs.run_job(args.run_id, args.dispatch)
    if code:
        sys.exit(code)
    return {"run_id": args.run_id, "state": jobs.job_state(args.run_id).state}
