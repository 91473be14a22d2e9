"""Harness A: synthetic matrices with closed-form, independently computed answers (is the maths right?)."""
