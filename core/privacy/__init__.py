"""Privacy: per-institution policies, differential privacy, secure aggregation."""
