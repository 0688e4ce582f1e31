"""Attention-MIL heads on frozen cell embeddings, with padded-bag batching."""
