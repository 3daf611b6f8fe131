"""The Flower backend: a ServerApp that drives m3tfed rounds and a ClientApp per institution."""
