"""The torch runtime: llama forward pass, SeedΔ projections (materialized and sparse), tokenizers."""
