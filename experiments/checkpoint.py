"""Orbax checkpoints of the train state (params, optimizer state, non-gradient state, step).

``CheckpointManager`` keeps the newest ``keep`` steps under ``RUN_DIR/checkpoints``.
Restoring needs an abstract target (shapes, dtypes, shardings) built from the
current config; a checkpoint that does not match it (another model, a corrupt or
partial directory) raises ``ValueError`` with the directory and the cause, before
any training step is compiled.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state) -> None:
        self.manager.save(step, args=ocp.args.StandardSave(state))

    def restore(self, step: int, abstract_state):
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # orbax raises many types for mismatches/corruption
            raise ValueError(f"checkpoint {self.directory}/{step} cannot be restored into this "
                             f"config's train state (corrupt, partial, or saved by a different "
                             f"model/optimizer): {type(e).__name__}: {str(e)[:300]}") from e

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
