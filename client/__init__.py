"""Flower ClientApp of mops-fl: thin glue over mops_core."""
