"""Built-in task experts (registered through the m3tfed entry-point group)."""
