"""`python -m sharding.plan`: the old name of `python -m planner` (the memory planner is a job now,
planner/; sharding/ knows nothing of Llama). Only the entry point is here."""
