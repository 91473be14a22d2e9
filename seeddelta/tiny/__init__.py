"""Harness B: the tiny transformer (dataset, tokenizer, training, checkpoint, export, release, evaluation).

Its committed files live in the package data; `seeddelta.assets` names them."""
