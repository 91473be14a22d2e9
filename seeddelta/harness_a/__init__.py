"""Harness A: synthetic matrices with closed-form, independently computed answers (is the maths right?).

The names below are what `seeddelta toy` offers; they live here (not in `grid`) so that the command
line can list them without importing the codec and torch."""

PATTERNS = ("identity", "diag", "lowrank", "circulant", "block", "identity_delta", "xor")
BASES = ("none", "xor_circulant", "lowrank", "circulant")
