"""Distributed runs: per-site workers pull device jobs from a procrastinate queue on the history's PostgreSQL.

queue (the procrastinate app, job states, stalled-worker recovery) · artifacts (artifacts for workers: in the
database or a shared directory) · worker (`edgepipe worker --site NAME`: probe and measure jobs) · coordinator
(`edgepipe run --distributed`: convert once, enqueue, wait with progress, collect).
"""
