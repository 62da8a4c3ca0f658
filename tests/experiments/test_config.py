"""Experiment config: overrides, validation before compilation, experiment-file loading."""

import dataclasses
import textwrap

import pytest

import archs
from experiments.config import (EvalConfig, ExperimentConfig, TrainConfig, apply_override,
                                load_experiment_file, parse_override, with_overrides)
from experiments.tasks import make_task


def _cfg(**kw):
    base = dict(name="t", model=archs.preset("llama", "tiny", vocab_size=64, max_len=64),
                task=make_task("mqar", seq_len=32, vocab_size=64, num_kv_pairs=4))
    base.update(kw)
    return ExperimentConfig(**base)


def test_overrides_parse_literals_and_walk_nested_tuples():
    cfg = with_overrides(_cfg(), ["train.steps=7", "optimizer.lr=3e-4", "model.pattern.0.mixer.attn_impl='blockwise'",
                                  "model.norm=layernorm", "eval.lengths=(32, 64)", "model.pattern.0.mixer.window=None"])
    assert cfg.train.steps == 7 and cfg.optimizer.lr == 3e-4 and cfg.model.norm == "layernorm"
    assert cfg.model.pattern[0].mixer.attn_impl == "blockwise" and cfg.eval.lengths == (32, 64)
    assert parse_override("a.b=[1, 2]") == (["a", "b"], [1, 2])
    assert with_overrides(_cfg(), ["optimizer.lr=1"]).optimizer.lr == 1.0  # int -> float field


@pytest.mark.parametrize("text,match", [
    ("train.stepz=3", r"no field 'stepz'; valid fields: \[.*'steps'"),
    ("train.steps='many'", "expected a int"),
    ("train.steps", "expected key=value"),
    ("model.pattern.3.mixer.attn_impl='dense'", "not an index"),
    ("train.loss_on_all_tokens=1", "expected a bool"),
])
def test_override_errors_name_the_field(text, match):
    with pytest.raises(ValueError, match=match):
        path, value = parse_override(text)
        apply_override(_cfg(), path, value)


@pytest.mark.parametrize("change,match", [
    (dict(task=make_task("mqar", seq_len=32, vocab_size=64, num_kv_pairs=4).__class__(
        seq_len=32, vocab_size=8, num_kv_pairs=4)), r"task.vocab_size=8 is too small"),
    (dict(train=TrainConfig(steps=0)), r"train.steps=0 must be a positive integer"),
    (dict(train=TrainConfig(batch_size=-2)), r"train.batch_size=-2"),
    (dict(eval=EvalConfig(lengths=(32, 128))), r"eval.lengths\[1\]=128 exceeds model.max_len=64"),
    (dict(model=archs.preset("llama", "tiny", vocab_size=32, max_len=64)), r"model.vocab_size=32 is smaller"),
    (dict(train=TrainConfig(segment_len=5)), r"train.segment_len=5 must be a positive divisor"),
    (dict(name=""), r"name=''"),
])
def test_validation_errors(change, match):
    with pytest.raises(ValueError, match=match):
        dataclasses.replace(_cfg(), **change).validate()


def test_noncausal_model_is_refused_on_next_token_tasks():
    model = archs.preset("llama", "tiny", vocab_size=64, max_len=64, causal=False)
    with pytest.raises(ValueError, match="not causal"):
        _cfg(model=model).validate()


def test_experiment_file_loader(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('"""nothing here"""\nX = 1\n')
    with pytest.raises(ValueError, match="neither get_config"):
        load_experiment_file(str(bad))
    with pytest.raises(ValueError, match="does not exist"):
        load_experiment_file(str(tmp_path / "missing.py"))
    good = tmp_path / "good.py"
    good.write_text(textwrap.dedent('''
        """doc"""
        import archs
        from experiments.config import ExperimentConfig
        from experiments.tasks import make_task
        def get_sweep(smoke=False):
            task = make_task("copy", seq_len=16, vocab_size=32)
            return [ExperimentConfig(name=f"r{i}", model=archs.preset("llama", "tiny", vocab_size=32),
                                     task=task) for i in range(2 if smoke else 3)]
    '''))
    assert [r.name for r in load_experiment_file(str(good), smoke=True)] == ["r0", "r1"]
    assert len(load_experiment_file(str(good))) == 3


def test_shipped_experiment_files_load_and_validate():
    import glob
    files = sorted(glob.glob("experiments/configs/*.py"))
    assert "experiments/configs/quickstart.py" in files and "experiments/configs/mqar.py" in files
    for path in files:
        for smoke in (True, False):
            runs = load_experiment_file(path, smoke=smoke)
            for r in runs:
                r.validate()
