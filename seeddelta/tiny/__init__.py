"""Harness B: the tiny transformer (dataset, tokenizer, training, export)."""
