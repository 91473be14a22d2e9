"""Shared test tolerances, check functions and fixtures (shipped so downstream suites can reuse them)."""
