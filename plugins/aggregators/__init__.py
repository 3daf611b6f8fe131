"""Built-in aggregators (registered through the m3tfed entry-point group)."""
