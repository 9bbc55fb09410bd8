"""Meshes and the logical -> mesh axis rules. Knows nothing of Llama."""
