"""`xpuserve bench`: a load generator for any OpenAI-compatible endpoint.

dataset.py makes the prompts, client.py sends one streaming request and times it, run.py sends
them all (arrival process, concurrency limit), summary.py aggregates, report.py prints and saves.
"""
