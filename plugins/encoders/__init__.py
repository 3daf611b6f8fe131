"""Built-in encoders (registered through the m3tfed entry-point group)."""
