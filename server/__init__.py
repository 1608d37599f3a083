"""Flower ServerApp of mops-fl: the strategy and the round loop, thin glue over mops_core."""
