"""The command line: `python -m core <command> [options]` mirrors every page of the app.

Each command lives in `core/stages/<module>.py`. A stage module has a typed `Settings` dataclass
and `run(settings, progress) -> dict`; its options are derived from the dataclass
(`core.lab.cli`). A few machinery commands (`job`, `countdown`) still take `add_arguments(parser)`
and `run(args) -> dict`. Progress goes to stderr; the returned dict is printed as the **last line of
stdout, one JSON object**, so scripts can read the headline figures. A user mistake (a
`GlassBoxError`) prints one line on stderr and exits with code 2 — no traceback.

Only the chosen command's module is imported, so `python -m core data list` stays quick.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from core.gpt.errors import GlassBoxError
from core.lab import cli, runs, server_settings

# command → (module in core/stages, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("data_cmd", "list the data sources, or fetch one (stage 1's corpora, SMS spam, instructions)"),
    "tokenize": ("tokenize", "train a tokeniser on a corpus and save it as a run (stage 1)"),
    "attention": ("attention", "attention step by step on a short text (stage 2)"),
    "inspect": ("inspect", "forward trace and parameter budget of a preset or run (stage 3)"),
    "import": ("import_gpt2", "import a GPT-2/Llama folder, a GGUF file or smollm2-135m-instruct (stage 3)"),
    "import-gpt2": ("import_gpt2", "import GPT-2 weights from a Hugging Face folder (stage 3)"),
    "export": ("export", "export a run to the Hugging Face GPT-2 layout (stage 3)"),
    "pretrain": ("pretrain", "pre-train a language model (stage 4)"),
    "classify": ("classify", "fine-tune a run for spam classification (stage 5)"),
    "instruct": ("instruct", "fine-tune a run to follow instructions (stage 6)"),
    "judge": ("judge", "score answers with an LLM judge (stage 7)"),
    "generate": ("generate", "generate one token at a time, with each step's probabilities (microscope)"),
    "surprise": ("surprise", "per-token loss of a text: which tokens surprise the model (microscope)"),
    "lens": ("lens", "logit lens: the next-token guess of every layer (microscope)"),
    "snapshots": ("snapshots", "list a run's training snapshots (stage 4 history)"),
    "prefer": ("prefer", "preference tuning (DPO) of an instruction-tuned run (beyond the seven stages)"),
    "serve": ("serve", "an OpenAI-compatible server for a run (chat completions)"),
    "classroom": ("classroom", "a classroom server's progress, leaderboard and report cards (the teacher's page)"),
    "bench": ("bench", "measure the speed of this machine and the engine"),
    "job": ("job", "(internal) run a background job's command inside its run folder"),
    "countdown": ("countdown", "(internal) a tiny resumable job that tests the job machinery"),
}


def _usage() -> str:
    lines = ["usage: python -m core <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items() if not help_.startswith("(internal)")]
    lines += ["", "`python -m core <command> --help` shows a command's options."]
    return "\n".join(lines)


class _ArgumentError(GlassBoxError):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so jobs and tests see a typed error."""

    def error(self, message: str):
        raise _ArgumentError(f"{self.prog}: {message}")


def build_parser(command: str) -> argparse.ArgumentParser:
    module_name, help_ = COMMANDS[command]
    module = importlib.import_module(f"core.stages.{module_name}")
    parser = _Parser(prog=f"python -m core {command}", description=help_)
    settings_cls = getattr(module, "Settings", None)
    if settings_cls is not None:
        cli.add_arguments(parser, settings_cls)
        progress = getattr(module, "print_progress", None)

        def _run(args):
            return module.run(cli.settings_from_args(settings_cls, args), progress=progress)

        parser.set_defaults(_run=_run)
    else:
        module.add_arguments(parser)
        parser.set_defaults(_run=module.run)
    return parser


def run_command(argv: list[str]) -> dict:
    """Parse `argv` (without the program name), run the command, return its result dict."""
    if not argv or argv[0] in ("-h", "--help"):
        raise _ArgumentError(_usage())
    command = argv[0]
    if command not in COMMANDS:
        raise _ArgumentError(f"unknown command {command!r}; `python -m core --help` lists the commands.")
    args = build_parser(command).parse_args(argv[1:])
    args.dispatch = run_command  # the `job` command runs a stored command line through it
    result = args._run(args)
    return result if isinstance(result, dict) else {"result": result}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    runs.started_from_command_line()
    try:
        return _main(argv)
    finally:
        runs.started_from_command_line(False)


def _main(argv: list[str]) -> int:
    try:
        server_settings.apply()  # .streamlit/classroom.toml; the shell's variables win
        result = run_command(argv)
        runs.finish_runs_started_here(stopped=bool(result.get("stopped")))
    except _ArgumentError as e:
        asked_for_help = argv[:1] in (["-h"], ["--help"])
        print(str(e) if asked_for_help else f"error: {e}", file=sys.stderr)
        return 0 if asked_for_help else 2
    except GlassBoxError as e:
        runs.finish_runs_started_here(error=str(e))
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        runs.finish_runs_started_here(error="Interrupted (Ctrl-C); the last checkpoint is kept.")
        print("error: interrupted", file=sys.stderr)
        return 130
    except BaseException as e:
        runs.finish_runs_started_here(error=f"Internal error: {type(e).__name__}: {e}")
        raise
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
