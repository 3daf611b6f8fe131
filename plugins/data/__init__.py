"""Built-in data (registered through the m3tfed entry-point group)."""
