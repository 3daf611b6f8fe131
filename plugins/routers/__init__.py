"""Built-in routers (registered through the m3tfed entry-point group)."""
