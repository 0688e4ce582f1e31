"""Cell data: the built-in synthetic generator, bag simulation and batching."""
