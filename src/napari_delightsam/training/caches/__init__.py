"""Inputs computed once and trained on many times (frozen-encoder embeddings)."""
