"""The `backstop` command."""
