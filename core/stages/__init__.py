"""One home per stage: settings, `run(settings, progress)` and `results(run_id)`.

The CLI (`python -m core`) and the pages both call these; they use the textbook and the machinery.
"""
