"""Benchmarks: the per-stage speed and memory benchmark (:mod:`.speed`), the DragBench runner (:mod:`.dragbench`)
with its metrics (:mod:`.metrics`), and the synthetic optimiser benchmark (:mod:`.synthetic`).

Submodules are imported on use: each pulls in different heavy dependencies.
"""
