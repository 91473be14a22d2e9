"""SeedΔ: structured base + sparse top-K residual compression of GGUF FFN weights."""

__version__ = "0.1.0"
