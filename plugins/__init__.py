"""m3tfed's built-in plugins: encoders, routers, aggregators, data sources, backends.

Each subpackage registers through the ``m3tfed`` entry-point group, exactly as a
third-party package does (see pyproject.toml).
"""
