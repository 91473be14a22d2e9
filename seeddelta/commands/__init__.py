"""Subcommands of the seeddelta CLI (one module each, see seeddelta.cli)."""
