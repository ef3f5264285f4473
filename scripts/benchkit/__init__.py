"""Pieces of scripts/bench.py: stores, targets (persistence and raw drivers), workloads."""
