"""Meshes, logical-axis rules and sharding of model state."""
