"""Orbax checkpoints of the train state (params, optimizer state, non-gradient state,
step), with integrity manifests.

``Checkpointer`` keeps the newest ``keep`` steps under ``RUN_DIR/checkpoints``.
Restoring needs an abstract target (shapes, dtypes, shardings) built from the
current config; a checkpoint that does not match it (another model, a corrupt or
partial directory) raises ``ValueError`` with the directory and the cause, before
any training step is compiled.

Integrity: once a save has finished, a manifest ``checkpoints/<step>.manifest.json``
records the size and BLAKE2b digest of every file of that step. Restoring verifies
the step's files against it first and refuses a damaged checkpoint (same size,
different bytes included) with the step, the damaged file, and the newest other step
that still verifies. A step without a manifest (saved by an older archlab, or a crash
between the end of the save and the manifest) is restored with a warning that it
could not be verified. Manifests are written by process 0 only (multi-host runs share
the directory).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings

import jax
import orbax.checkpoint as ocp

MANIFEST_SUFFIX = ".manifest.json"


class CheckpointIntegrityError(ValueError):
    """A checkpoint's bytes differ from those recorded when it was saved."""


class Checkpointer:
    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
        self._unrecorded: list[int] = []

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def save(self, step: int, state) -> None:
        self._record_finished()
        self.manager.save(step, args=ocp.args.StandardSave(state))
        self._unrecorded.append(step)

    def restore(self, step: int, abstract_state):
        self.verify(step)
        try:
            return self.manager.restore(step, args=ocp.args.StandardRestore(abstract_state))
        except Exception as e:  # orbax raises many types for mismatches/corruption
            raise ValueError(f"checkpoint {self.step_dir(step)} cannot be restored into this "
                             f"config's train state (corrupt, partial, or saved by a different "
                             f"model/optimizer): {type(e).__name__}: {str(e)[:300]}") from e

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def verify(self, step: int) -> None:
        """Raises CheckpointIntegrityError if step's files differ from its manifest."""
        path = self._manifest_path(step)
        if not os.path.exists(path):
            warnings.warn(f"checkpoint {self.step_dir(step)} has no integrity manifest; "
                          "restoring it unverified", stacklevel=2)
            return
        problem = _first_mismatch(self.step_dir(step), _read_manifest(path))
        if problem is None:
            return
        others = [s for s in reversed(self.all_steps()) if s != step and self._verifies(s)]
        hint = (f"; the newest other checkpoint that verifies is step {others[0]} "
                f"({self.step_dir(others[0])}): move the damaged step directory away to resume from it"
                if others else "; no other verified checkpoint exists")
        raise CheckpointIntegrityError(f"checkpoint step {step} at {self.step_dir(step)} is "
                                       f"damaged: {problem}{hint}")

    def wait(self) -> None:
        self.manager.wait_until_finished()
        self._record_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    # --- manifests -------------------------------------------------------------------
    def _manifest_path(self, step: int) -> str:
        return os.path.join(self.directory, f"{step}{MANIFEST_SUFFIX}")

    def _verifies(self, step: int) -> bool:
        path = self._manifest_path(step)
        return os.path.exists(path) and _first_mismatch(self.step_dir(step), _read_manifest(path)) is None

    def _record_finished(self) -> None:
        """Writes manifests of saves that have finished (waits for the pending save)."""
        if not self._unrecorded:
            return
        self.manager.wait_until_finished()
        kept = set(self.manager.all_steps())
        for step in self._unrecorded:
            if step in kept and jax.process_index() == 0:
                _write_atomic(self._manifest_path(step), json.dumps(_digest_tree(self.step_dir(step))))
        for name in os.listdir(self.directory):   # drop manifests of steps orbax deleted
            if name.endswith(MANIFEST_SUFFIX) and jax.process_index() == 0:
                stem = name[: -len(MANIFEST_SUFFIX)]
                if stem.isdigit() and int(stem) not in kept:
                    os.remove(os.path.join(self.directory, name))
        self._unrecorded = []


def _digest_tree(root: str) -> dict[str, list]:
    """{relative path: [size, blake2b hex]} of every file under root."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in sorted(files):
            full = os.path.join(dirpath, name)
            out[os.path.relpath(full, root)] = [os.path.getsize(full), _digest_file(full)]
    return out


def _digest_file(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_mismatch(root: str, manifest: dict[str, list]) -> str | None:
    for rel, (size, digest) in sorted(manifest.items()):
        full = os.path.join(root, rel)
        if not os.path.exists(full):
            return f"file {full} is missing"
        if os.path.getsize(full) != size:
            return f"file {full} has {os.path.getsize(full)} bytes, {size} were saved"
        if _digest_file(full) != digest:
            return f"file {full} has different bytes from those saved (checksum mismatch)"
    return None


def _read_manifest(path: str) -> dict[str, list]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointIntegrityError(f"integrity manifest {path} is unreadable: {e}") from e


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
