"""The machinery: the run store, jobs, devices and threads, the data registry, weight I/O,
the judge's HTTP client and the benchmark. It may use the textbook (`core.gpt`), never the stages.
"""
