"""``archlab convert --from-hf`` writes an init directory that ``--init-from`` reads back
exactly (experiments/convert.py)."""

from pathlib import Path

import flax
import jax
import numpy as np
import pytest

from archs.hf import from_hf
from experiments import cli, convert

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "qwen2"


def test_convert_cli_round_trips_config_and_params(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["convert", "--from-hf", str(FIXTURE), "--out", str(out)]) == 0
    assert "--init-from" in capsys.readouterr().out
    cfg, params = from_hf(FIXTURE)
    assert convert.init_config(str(out)) == cfg
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params["params"])
    restored = convert.init_params(str(out), shapes)
    a, b = (flax.traverse_util.flatten_dict(t) for t in (params["params"], restored))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(b[k]), a[k], err_msg="/".join(k))
    with pytest.raises(ValueError, match="not empty"):
        convert.convert_hf(str(FIXTURE), str(out))


def test_convert_carries_state_and_overwrites_only_its_own_directories(tmp_path):
    deepseek = FIXTURE.parent / "deepseek_v3"
    out = tmp_path / "ds"
    convert.convert_hf(str(deepseek), str(out))
    _, params = from_hf(deepseek)
    shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params["state"])
    restored = convert.init_state(str(out), shapes)          # DeepSeek-V3's router bias
    for a, b in zip(jax.tree.leaves(params["state"]), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(b), np.asarray(a))
    convert.convert_hf(str(deepseek), str(out), overwrite=True)   # its own directory: replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not made by archlab convert"):
        convert.convert_hf(str(deepseek), str(mine), overwrite=True)
    assert (mine / "notes.txt").read_text() == "keep me"


EXPERIMENT = '''"""init-from test."""
import archs
from experiments.config import EvalConfig, ExperimentConfig, OptimizerConfig, ScheduleConfig, TrainConfig
from experiments.tasks import make_task


def get_config(smoke=False):
    return ExperimentConfig(
        name="init", arch="qwen2", model=archs.preset("llama", "tiny", vocab_size=96, max_len=64),
        task=make_task("mqar", seq_len=32, vocab_size=96, num_kv_pairs=4),
        optimizer=OptimizerConfig(lr=1e-4), schedule=ScheduleConfig(warmup_steps=1),
        train=TrainConfig(steps=1, batch_size=4, log_every=1),
        eval=EvalConfig(every=1, lengths=(32,), batches=1, batch_size=4))
'''


@pytest.mark.slow
def test_run_init_from_starts_from_the_converted_parameters(tmp_path):
    import orbax.checkpoint as ocp
    conv, run = tmp_path / "conv", tmp_path / "run"
    (tmp_path / "exp.py").write_text(EXPERIMENT)
    assert cli.main(["convert", "--from-hf", str(FIXTURE), "--out", str(conv)]) == 0
    assert cli.main(["run", str(tmp_path / "exp.py"), "--init-from", str(conv), "--out", str(run),
                     "--no-progress"]) == 0
    assert '"name": "hf_qwen2"' in (run / "config.json").read_text()
    state = ocp.StandardCheckpointer().restore(str(run / "checkpoints" / "1" / "default"))
    _, params = from_hf(FIXTURE)
    got = flax.traverse_util.flatten_dict(state["params"])
    for k, want in flax.traverse_util.flatten_dict(params["params"]).items():
        # one AdamW step at lr 1e-4 moves each parameter by about 1e-4
        np.testing.assert_allclose(np.asarray(got[k]), want, atol=3e-4, err_msg="/".join(k))
