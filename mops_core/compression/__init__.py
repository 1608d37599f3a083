"""Compression of the frozen base before tuning: SparseGPT, Wanda, magnitude pruning, int8.

`pipeline.prepare_base(settings)` is the entry point: the base model, compressed as the
`compression` setting says, from the cache when an earlier run (or another client) made it.
This module stays import-light so that settings can validate a compression spec cheaply.
"""
