"""``python -m ftd.config``: print the configuration reference (Markdown) generated from the
schema; docs/configuration.md is this output (a test keeps them equal)."""

from ftd.config import schema_reference

print(schema_reference(), end="")
