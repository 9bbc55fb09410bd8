"""Meshes, the logical -> mesh axis rules and hardware topologies. Knows nothing of Llama (the memory
planner that used to live here as sharding/plan.py is the `planner` job; `python -m sharding.plan`
still runs it)."""
