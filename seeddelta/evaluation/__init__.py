"""Evaluation on loaded models: windows, perplexity and KL divergence, hidden-state drift, greedy pack, sweep, memory."""
