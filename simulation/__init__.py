"""Simulations and benchmarks of mops-fl: launching Ray-backed Flower runs, the paper's tables and figures."""
