"""Training checkpoints: Orbax CheckpointManager (async) holding the train state (adapters or
weights, optimizer state, step, rng) and the data iterator's position, keeping the last K.

Orbax writes each step to a temporary directory and renames it when complete, so an interrupted
save never damages (or masquerades as) a finished checkpoint; on gs:// (no atomic rename) it writes the
step in place and a commit marker last, and only steps with the marker count as finished.
"""

from __future__ import annotations

import jax
import orbax.checkpoint as ocp

from model.formats import paths


def manager(directory, keep: int) -> ocp.CheckpointManager:
    """`directory`: local or gs://."""
    return ocp.CheckpointManager(
        paths.absolute(directory),
        # cleanup: the remains of a save cut short (a preempted or killed process) go when the run restarts
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True))


def save(mgr: ocp.CheckpointManager, step: int, state, data_state: dict) -> None:
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
             force=True)


def restore(mgr: ocp.CheckpointManager, step: int, abstract_state, shardings):
    """Restores straight into `shardings` (any mesh); returns (state, data_state)."""
    target = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract_state, shardings)
    got = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                    data=ocp.args.JsonRestore()))
    return got["state"], got["data"]


def restore_latest(directory):
    """The newest train state as saved (for inspection and export)."""
    mgr = ocp.CheckpointManager(paths.absolute(directory))
    step = mgr.latest_step()
    if step is None:
        raise FileNotFoundError(f"{directory}: no finished checkpoint")
    state = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return _unwrap(state)


def _unwrap(tree):
    """nnx Variables are saved as {"value": array}; give back plain nested dicts of arrays."""
    if isinstance(tree, dict):
        if set(tree) == {"value"}:
            return tree["value"]
        return {k: _unwrap(v) for k, v in tree.items()}
    return tree
