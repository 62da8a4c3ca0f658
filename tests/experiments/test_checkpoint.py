"""Checkpoint integrity: a damaged checkpoint (same size, different bytes) is refused with
the step, the file and the newest step that still verifies; intact ones restore exactly."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from experiments.checkpoint import CheckpointIntegrityError, Checkpointer, abstract_like


def _state(v):
    return {"w": jnp.full((64, 32), v, jnp.float32), "step": jnp.asarray(v, jnp.int32)}


def _largest_file(root):
    files = [os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs]
    return max(files, key=os.path.getsize)


def test_restore_verifies_and_refuses_a_damaged_step(tmp_path):
    ck = Checkpointer(str(tmp_path / "checkpoints"), keep=3)
    ck.save(1, _state(1))
    ck.save(2, _state(2))
    ck.wait()
    target = abstract_like(_state(0))
    np.testing.assert_array_equal(ck.restore(2, target)["w"], np.full((64, 32), 2.0))
    victim = _largest_file(ck.step_dir(2))
    data = bytearray(open(victim, "rb").read())
    data[len(data) // 2] ^= 0xFF                      # flip one byte, same size
    open(victim, "wb").write(bytes(data))
    with pytest.raises(CheckpointIntegrityError, match=r"step 2 .*damaged.*checksum.*step 1"):
        ck.restore(2, target)
    np.testing.assert_array_equal(ck.restore(1, target)["w"], np.full((64, 32), 1.0))
    ck.close()


def test_manifests_follow_the_kept_steps(tmp_path):
    ck = Checkpointer(str(tmp_path / "checkpoints"), keep=2)
    for step in (1, 2, 3):
        ck.save(step, _state(step))
    ck.close()
    manifests = sorted(f for f in os.listdir(ck.directory) if f.endswith(".manifest.json"))
    assert manifests == ["2.manifest.json", "3.manifest.json"]
