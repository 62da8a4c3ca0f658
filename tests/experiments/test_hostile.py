"""Hostile and careless inputs: each class of mistake is refused with a message naming the
file/field, the value and what is allowed, before anything is compiled."""

import textwrap

import pytest

import archs
from experiments.config import (ExperimentConfig, ExperimentFileError, load_experiment_file,
                                with_overrides)
from experiments.tasks import make_task


def _cfg(**kw):
    base = dict(name="t", model=archs.preset("llama", "tiny", vocab_size=64, max_len=64),
                task=make_task("mqar", seq_len=32, vocab_size=64, num_kv_pairs=4))
    base.update(kw)
    return ExperimentConfig(**base)


GOOD_BODY = '''
import archs
from experiments.config import ExperimentConfig
from experiments.tasks import make_task
'''


@pytest.mark.parametrize("body,match", [
    ('"""doc"""\ndef get_config(smoke=False)\n    return 1\n', r"bad\.py:2: syntax error"),
    ('"""doc"""\nimport numpy\nimport no_such_module_xyz\n', r"bad\.py:3: loading .*ModuleNotFoundError.*no_such_module_xyz"),
    ('"""doc"""\ndef get_config(smoke=False):\n    return {"name": "x"}\n', r"get_config\(\) returned a dict"),
    ('"""doc"""\ndef get_config():\n    return None\n', r"must accept the keyword argument 'smoke'"),
    ('"""doc"""\ndef get_config(smoke=False):\n    x = 1\n    raise RuntimeError("boom")\n',
     r"bad\.py:4: get_config\(\) failed: RuntimeError: boom"),
    ('"""doc"""\ndef get_sweep(smoke=False):\n    return None\n', r"get_sweep\(\) returned a NoneType"),
], ids=["syntax", "import", "wrong-type", "no-smoke-arg", "raises", "sweep-not-list"])
def test_experiment_file_errors_name_file_line_and_cause(tmp_path, body, match):
    path = tmp_path / "bad.py"
    path.write_text(body)
    with pytest.raises(ExperimentFileError, match=match):
        load_experiment_file(str(path))


def test_a_good_file_still_loads(tmp_path):
    path = tmp_path / "good.py"
    path.write_text('"""doc"""' + GOOD_BODY + textwrap.dedent('''
        def get_config(smoke=False):
            return ExperimentConfig(name="ok", model=archs.preset("llama", "tiny"),
                                    task=make_task("copy", seq_len=16, vocab_size=32))
    '''))
    assert [r.name for r in load_experiment_file(str(path))] == ["ok"]


@pytest.mark.parametrize("override,match", [
    ("train.steps=10.5", r"train\.steps=10\.5: expected an int"),
    ("optimizer=None", r"optimizer=None: this field needs a value"),
    ("model.d_model=None", r"model\.d_model=None: this field needs a value"),
    ("train.batch_size=True", r"expected a bool|expected a int"),
], ids=["float-for-int", "none-for-config", "none-for-int", "bool-for-int"])
def test_no_silent_coercion(override, match):
    with pytest.raises(ValueError, match=match):
        with_overrides(_cfg(), [override])


def test_none_is_accepted_where_the_field_allows_it():
    cfg = with_overrides(_cfg(), ["train.segment_len=None", "model.pattern.0.mixer.window=None"])
    cfg.validate()


@pytest.mark.parametrize("override,match", [
    ("optimizer.lr=1e999", r"optimizer\.lr=inf must be a finite number"),
    ("optimizer.lr=0.0", r"optimizer\.lr=0\.0 must be a finite number in \(0"),
    ("optimizer.b1=1.0", r"optimizer\.b1=1\.0 must be a finite number in \[0\.0, 1\.0\)"),
    ("optimizer.b2=-0.1", r"optimizer\.b2"),
    ("optimizer.eps=0.0", r"optimizer\.eps=0\.0"),
    ("optimizer.grad_clip=-1.0", r"optimizer\.grad_clip"),
    ("model.norm_eps=-1e-05", r"model\.norm_eps=-1e-05"),
    ("schedule.final_lr_fraction=2.0", r"schedule\.final_lr_fraction=2\.0"),
], ids=["lr-inf", "lr-zero", "b1-one", "b2-neg", "eps-zero", "clip-neg", "norm-eps-neg", "final-frac"])
def test_out_of_range_hyperparameters_are_refused(override, match):
    with pytest.raises(ValueError, match=match):
        with_overrides(_cfg(), [override]).validate()


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".", "", "x y"])
def test_run_names_are_plain_names(name):
    with pytest.raises(ValueError, match=r"name=.*must be a plain run name"):
        _cfg(name=name).validate()


def test_a_long_training_sequence_is_reported_as_task_seq_len():
    cfg = _cfg(task=make_task("mqar", seq_len=128, vocab_size=64, num_kv_pairs=4))
    with pytest.raises(ValueError, match=r"task\.seq_len=128 exceeds model\.max_len=64"):
        cfg.validate()
