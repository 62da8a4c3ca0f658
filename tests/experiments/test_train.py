"""The train loop end to end through the CLI: outputs, determinism, exact resume,
run-directory protection, bad checkpoints, and the report."""

import json
import os
import shutil
import textwrap

import pytest

from experiments.cli import main

CONFIG = textwrap.dedent('''
    """Tiny test experiment: archlab run THIS --out DIR (trains in seconds)."""
    import archs
    from experiments.config import EvalConfig, ExperimentConfig, TrainConfig
    from experiments.tasks import make_task

    def get_config(smoke=False):
        return ExperimentConfig(
            name="tiny", model=archs.preset("llama", "tiny", vocab_size=32, d_model=32, max_len=64),
            task=make_task("mqar", seq_len=16, vocab_size=32, num_kv_pairs=2),
            train=TrainConfig(steps=8, batch_size=4, log_every=2, checkpoint_every=4),
            eval=EvalConfig(every=4, lengths=(16, 32), batches=1, batch_size=4))
''')


def _rows(run_dir):
    """Metric rows without wall-clock fields (the only thing allowed to differ)."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    for r in rows:
        r.pop("tokens_per_s", None)
    return rows


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cfg = root / "tiny.py"
    cfg.write_text(CONFIG)
    out = root / "a"
    assert main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 0
    return root, cfg, out


def test_run_writes_config_metrics_checkpoints_and_report(first_run):
    root, cfg, out = first_run
    for name in ("config.json", "metrics.jsonl", "report.md", "accuracy_vs_length.png", "loss.png"):
        assert os.path.isfile(out / name), name
    assert sorted(os.listdir(out / "checkpoints")) == ["4", "4.manifest.json", "8", "8.manifest.json"]
    rows = _rows(out)
    with open(out / "metrics.jsonl") as f:
        train = [json.loads(line) for line in f if '"train"' in line]
    evals = [r for r in rows if r["split"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6, 8]
    assert {(r["step"], r["length"]) for r in evals} == {(4, 16), (4, 32), (8, 16), (8, 32)}
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert "acc@32" in (out / "report.md").read_text()
    # strict JSON: no bare NaN/Infinity
    summary = _strict_json((out / "summary.json").read_text())
    assert summary["steps"] == 8 and set(summary["eval"]) == {"16", "32"}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        _strict_json(line)


def _strict_json(text):
    def refuse(const):
        raise AssertionError(f"non-strict JSON constant {const}")
    return json.loads(text, parse_constant=refuse)


def test_same_config_and_seed_give_same_metrics_and_resume_is_exact(first_run):
    root, cfg, out = first_run
    again = root / "b"
    assert main(["run", str(cfg), "--out", str(again), "--no-progress"]) == 0
    assert _rows(again) == _rows(out)
    # resume from the step-4 checkpoint: the re-run steps must reproduce the metrics exactly
    resumed = root / "c"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "checkpoints" / "8")
    metrics = (resumed / "metrics.jsonl").read_text()
    (resumed / "metrics.jsonl").write_text(metrics[:-25])   # a crash while writing the last row
    with pytest.warns(UserWarning, match=r"metrics\.jsonl:\d+: the last row is truncated"):
        assert main(["run", str(cfg), "--out", str(resumed), "--resume", "--no-progress"]) == 0
    assert _rows(resumed) == _rows(out)


def test_existing_run_directory_is_not_overwritten(first_run, capsys):
    root, cfg, out = first_run
    before = (out / "metrics.jsonl").read_text()
    assert main(["run", str(cfg), "--out", str(out), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text() == before
    # resume with a different model is refused before compiling
    assert main(["run", str(cfg), "--out", str(out), "--resume", "--set", "model.d_model=64"]) == 2
    assert "differs" in capsys.readouterr().err


def test_corrupt_checkpoint_gives_a_clear_error(first_run, capsys):
    root, cfg, out = first_run
    broken = root / "broken"
    shutil.copytree(out, broken)
    for dirpath, _, files in os.walk(broken / "checkpoints" / "8"):
        for f in files:
            with open(os.path.join(dirpath, f), "w") as fh:
                fh.write("garbage")
    config = (broken / "config.json").read_text()
    assert main(["run", str(cfg), "--out", str(broken), "--resume", "--no-progress",
                 "--set", "train.steps=12"]) == 2
    err = capsys.readouterr().err
    assert "checkpoint step 8" in err and "is damaged" in err and "step 4" in err, err
    assert (broken / "config.json").read_text() == config   # a failed resume changes nothing


def test_resuming_a_complete_run_changes_nothing_unless_steps_are_raised(first_run, capsys):
    root, cfg, out = first_run
    done = root / "done"
    shutil.copytree(out, done)
    summary = json.loads((done / "summary.json").read_text())
    os.remove(done / "summary.json")   # e.g. a crash between the final checkpoint and the summary
    files = ("config.json", "metrics.jsonl", "checkpoints/8.manifest.json")
    before = {f: (done / f).read_bytes() for f in files}
    assert main(["run", str(cfg), "--out", str(done), "--resume", "--no-progress"]) == 0
    assert "is complete (checkpoint step 8, train.steps=8); nothing to train" in capsys.readouterr().out
    assert {f: (done / f).read_bytes() for f in files} == before
    assert json.loads((done / "summary.json").read_text()) == summary
    assert main(["run", str(cfg), "--out", str(done), "--resume", "--no-progress",
                 "--set", "train.steps=10"]) == 0
    assert json.loads((done / "config.json").read_text())["train"]["steps"] == 10
    assert [r["step"] for r in _rows(done) if r["split"] == "train"] == [2, 4, 6, 8, 10]
    assert "10" in os.listdir(done / "checkpoints")


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.py")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["bench", "nonsense"]) == 2
    assert "valid" in capsys.readouterr().err
    assert main(["list"]) == 0
    assert "llama" in capsys.readouterr().out


def test_report_command_compares_runs(first_run):
    root, cfg, out = first_run
    rep, other = root / "cmp", root / "copy-for-report"
    if not other.exists():        # a second run directory, independent of other tests' order
        shutil.copytree(out, other)
    assert main(["report", str(out), str(other), "--out", str(rep)]) == 0
    text = (rep / "report.md").read_text()
    assert text.count("| tiny |") == 2


def _tiny_config(root, cfg_path, **eval_kw):
    import dataclasses

    from experiments.config import load_experiment_file
    cfg = load_experiment_file(str(cfg_path))[0]
    return dataclasses.replace(cfg, eval=dataclasses.replace(cfg.eval, **eval_kw))


def test_eval_model_override_reuses_trained_params(first_run, tmp_path):
    """``eval.model``: the same config again reproduces the plain run's evaluation exactly;
    RoPE scaling switched on at inference changes only the evaluation rows; a model with
    other parameters is refused before the run directory is touched."""
    import dataclasses

    import archs
    from experiments.train import run
    from layers.positions import RopeConfig
    root, cfg_path, out = first_run
    base = _tiny_config(root, cfg_path)
    same = dataclasses.replace(base.model)  # equal but not the same object
    run(_tiny_config(root, cfg_path, model=same), str(tmp_path / "same"), progress=False, write_report=False)
    assert _rows(tmp_path / "same") == _rows(out)

    scaled = archs.preset("llama", "tiny", vocab_size=32, d_model=32, max_len=64,
                          rope=RopeConfig(base=500000.0, scaling="linear", factor=4.0))
    run(_tiny_config(root, cfg_path, model=scaled), str(tmp_path / "scaled"), progress=False,
        write_report=False)
    got, want = _rows(tmp_path / "scaled"), _rows(out)
    assert [r for r in got if r["split"] == "train"] == [r for r in want if r["split"] == "train"]
    eval_loss = lambda rows: [r["loss"] for r in rows if r["split"] == "eval"]
    assert all(a != b for a, b in zip(eval_loss(got), eval_loss(want)))

    other = archs.preset("llama", "tiny", vocab_size=32, d_model=16, max_len=64)
    with pytest.raises(ValueError, match="eval.model"):
        run(_tiny_config(root, cfg_path, model=other), str(tmp_path / "bad"), progress=False)
    assert not os.path.exists(tmp_path / "bad")
    short = archs.preset("llama", "tiny", vocab_size=32, d_model=32, max_len=16)
    with pytest.raises(ValueError, match=r"eval.lengths\[1\]=32 exceeds eval.model.max_len=16"):
        _tiny_config(root, cfg_path, model=short).validate()


def test_report_diagnostics_keep_the_spread_of_array_metrics():
    """A per-expert load [E] must not average away to 1/E: mean plus a min-max band."""
    from experiments.report import diagnostic_series
    rows = [{"step": 10, "diag/moe_load": [0.7, 0.1, 0.1, 0.1]},
            {"step": 20, "diag/moe_load": [0.25, 0.25, 0.25, 0.25]}, {"step": 30}]
    steps, mean, lo, hi = diagnostic_series(rows, "diag/moe_load")
    assert steps == [10, 20]
    assert mean == pytest.approx([0.25, 0.25])
    assert lo == pytest.approx([0.1, 0.25]) and hi == pytest.approx([0.7, 0.25])
