"""Hostile and careless inputs, one class at a time: data loss (--overwrite, --out), silent
divergence (non-finite loss), user-code errors, damaged run files, coercion and range errors,
a step too large for memory. Each is refused with a message naming the file/field, the value
and what is allowed, and nothing the user has is lost."""

import json
import os
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


# ----------------------------------------------------------------- data loss (run directories)

TINY = '''"""Tiny hostile-test run."""
import archs
from experiments.config import EvalConfig, ExperimentConfig, TrainConfig
from experiments.tasks import make_task

def get_config(smoke=False):
    return ExperimentConfig(
        name="tiny", model=archs.preset("llama", "tiny", vocab_size=32, d_model=32, max_len=32),
        task=make_task("mqar", seq_len=16, vocab_size=32, num_kv_pairs=2),
        train=TrainConfig(steps=3, batch_size=4, log_every=1, checkpoint_every=1),
        eval=EvalConfig(every=3, batches=1, batch_size=4))
'''


@pytest.fixture
def tiny_file(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY)
    return str(path)


def test_overwrite_refuses_what_is_not_a_run_directory(tmp_path, tiny_file, capsys):
    from experiments.cli import main
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    assert main(["run", tiny_file, "--out", str(home), "--overwrite", "--no-progress"]) == 2
    assert "--overwrite refused" in capsys.readouterr().err
    assert (home / "thesis.tex").read_text() == "years of work"
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep")
    assert main(["run", tiny_file, "--out", str(a_file), "--overwrite", "--no-progress"]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err
    assert main(["run", tiny_file, "--out", str(a_file / "sub"), "--no-progress"]) == 2
    assert "cannot be created" in capsys.readouterr().err
    assert a_file.read_text() == "keep"


def test_overwrite_replaces_only_a_recognised_run_directory(tmp_path):
    import json

    from experiments import rundir
    cfg = _cfg()
    marked, legacy = tmp_path / "marked", tmp_path / "legacy"
    marked.mkdir()
    (marked / rundir.MARKER).write_text("")
    (marked / "old.txt").write_text("x")
    legacy.mkdir()   # a run made before the marker existed: archlab's config.json
    (legacy / "config.json").write_text(json.dumps({k: {} for k in rundir._CONFIG_KEYS}))
    for d in (marked, legacy):
        rundir.prepare(cfg, str(d), resume=False, overwrite=True)
        assert sorted(os.listdir(d)) == [rundir.MARKER]
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "config.json").write_text('{"name": "not archlab"}')
    with pytest.raises(ValueError, match="not an archlab run directory"):
        rundir.prepare(cfg, str(fake), resume=False, overwrite=True)
    assert (fake / "config.json").exists()


# ----------------------------------------------------------------- divergence

def _strict_json(text):
    def refuse(const):
        raise AssertionError(f"non-strict JSON constant {const}")
    return json.loads(text, parse_constant=refuse)


def test_divergence_stops_at_the_step_and_keeps_the_finite_checkpoint(tmp_path, tiny_file, capsys):
    from experiments.cli import main
    out = tmp_path / "nan"
    args = ["run", tiny_file, "--out", str(out), "--no-progress", "--set", "optimizer.lr=1e30",
            "--set", "schedule.warmup_steps=0"]
    assert main(args) == 3
    err = capsys.readouterr().err
    assert "diverged at step 2" in err and "last finite checkpoint is step 1" in err, err
    assert "Traceback" not in err
    assert sorted(os.listdir(out / "checkpoints")) == ["1", "1.manifest.json"]
    for line in (out / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)


def test_skip_step_counts_skipped_updates_and_ends_finite(tmp_path, tiny_file):
    import numpy as np

    from experiments.cli import main
    out = tmp_path / "skip"
    assert main(["run", tiny_file, "--out", str(out), "--no-progress", "--set", "optimizer.lr=1e30",
                 "--set", "schedule.warmup_steps=0", "--set", "train.on_nonfinite='skip_step'"]) == 0
    rows = [_strict_json(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows if r["split"] == "train"] == [0, 1, 1]
    assert [r["loss"] is None or r["grad_norm"] is None for r in rows if r["split"] == "train"] == [
        False, True, True]   # non-finite values are written as null
    summary = _strict_json((out / "summary.json").read_text())
    assert summary["skipped_steps"] == 2 and summary["steps"] == 3
    assert main(["export", str(out), "--out", str(tmp_path / "exported")]) == 0
    weights = np.load(tmp_path / "exported" / "params.npz")
    assert weights.files and all(np.isfinite(weights[k]).all() for k in weights.files)
    assert _strict_json((tmp_path / "exported" / "export.json").read_text())["step"] == 3


def test_train_on_nonfinite_is_validated():
    with pytest.raises(ValueError, match=r"train\.on_nonfinite='ignore' must be 'stop' or 'skip_step'"):
        with_overrides(_cfg(), ["train.on_nonfinite='ignore'"]).validate()


# ----------------------------------------------------------------- user-code errors, run files

def test_user_errors_exit_2_without_traceback_unless_debug(tmp_path, capsys):
    from experiments.cli import main
    bad = tmp_path / "bad.py"
    bad.write_text('"""doc"""\ndef get_config(smoke=False):\n    return 1 / 0\n')
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.py:3: get_config() failed: ZeroDivisionError" in err and "Traceback" not in err
    with pytest.raises(ExperimentFileError):
        main(["run", str(bad), "--debug"])


def test_damaged_metrics_rows_are_named_by_file_and_line(tmp_path, capsys):
    from experiments import rundir
    from experiments.cli import main
    run = tmp_path / "run"
    run.mkdir()
    (run / rundir.MARKER).write_text("")
    (run / "config.json").write_text(json.dumps({"name": "r", "model": {"name": "m"}, "task": {
        "__class__": "MQARConfig", "seq_len": 16}, "optimizer": {"lr": 1.0}}))
    good = '{"split": "train", "step": 1, "loss": 1.0, "accuracy": 0.0, "tokens_per_s": null}\n'
    (run / "metrics.jsonl").write_text(good + '{"split": "train", "st\n' + good)
    assert main(["report", str(run)]) == 2
    assert "metrics.jsonl:2: damaged metrics row" in capsys.readouterr().err
    (run / "metrics.jsonl").write_text(good + good[:20])   # a crash while writing the last row
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:2: the last row is truncated"):
        assert len(rundir.read_metrics(str(run))) == 1


# ----------------------------------------------------------------- memory

def test_a_step_too_large_for_memory_is_refused_before_running(tmp_path, tiny_file, capsys):
    from experiments.cli import main
    out = tmp_path / "big"
    assert main(["run", tiny_file, "--out", str(out), "--no-progress",
                 "--set", "train.batch_size=4194304"]) == 2
    err = capsys.readouterr().err
    assert "the train step would allocate" in err and "GiB is available" in err, err
    assert not (out / "metrics.jsonl").exists()
