"""A small, real HTTP search service (root + leaves) used as a tracing workload.

Each process keeps its own exact journal of which thread served which query id
and how many index preads it did, so a tracer's attribution can be checked
against ground truth.
"""
