"""The GGUF file format: the one way into a GGUF file (`reader.open_gguf`), the schema (kinds, tensor names, keys, architectures), the writer, SeedΔ tensors and imatrix files."""
