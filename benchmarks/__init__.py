"""Speed and memory benchmarks (`make bench`): figures, not pass/fail tests."""
