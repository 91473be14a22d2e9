"""`seeddelta regress`: the user's plan B1–B5, the v1 success criteria per preset, and the equal-bytes
comparison, as one report (suite.py runs the steps, report.py writes what a person reads)."""

STEPS = ("b1", "b2", "b3", "b4", "b5", "presets", "equal-bytes")
