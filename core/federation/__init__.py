"""Federation: components, the round loop, the update pipeline, checkpoints."""
