"""Built-in tasks (registered through the m3tfed entry-point group)."""
