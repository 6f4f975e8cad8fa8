"""Configuration: the typed schema of every key, loading YAML with overrides, per-key help, and the recipe files."""
