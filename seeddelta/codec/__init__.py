"""The codec: Walsh–Hadamard transforms, W0 kinds, top-K / block residuals, storage types, `encode` and weight metrics. Pure maths on numpy/torch arrays; knows nothing of files."""
