"""Tokenizers described by a GGUF's metadata: SentencePiece (`spm`) and GPT-2 byte-level BPE (`bpe`)."""
