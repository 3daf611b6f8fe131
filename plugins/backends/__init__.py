"""Built-in backends (registered through the m3tfed entry-point group)."""
