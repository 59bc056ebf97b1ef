"""The config: its schema (one pydantic tree), the listeners' sections, the field types they share,
the holder of the config in force, the reloads that replace it, and the checks against this box."""
