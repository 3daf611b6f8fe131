"""Flower apps for bench/round_overhead.py (importable, so Ray workers can load them)."""
