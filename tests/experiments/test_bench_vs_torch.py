"""`archlab bench vs-torch` plumbing that needs no torch: the CLI's exit 2 without torch,
the BENCHMARKS.md marker replacement, the alternating timer, ratios, the decode
difference, and that every archlab variant override is a valid switch of its family."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest

import archs
from experiments.bench import vs_torch as V
from experiments.bench import vs_torch_pairs as P
from experiments.cli import main


def test_without_torch_the_command_exits_2_naming_the_venv(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)          # `import torch` raises ImportError
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert main(["bench", "vs-torch", "--pairs", "llama_train_b4t512", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "make hf-venv" in err and ".venv-hf/bin/archlab bench vs-torch" in err


def test_unknown_pair_exits_2_listing_the_pairs(capsys):
    assert main(["bench", "vs-torch", "--pairs", "llama_train_b4t512,nope"]) == 2
    err = capsys.readouterr().err
    assert "'nope'" in err and "mamba2_decode" in err


def test_write_section_appends_once_then_replaces(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    original = "# benchmarks\n\n## other\n\nkeep me | a | b\n"
    path.write_text(original)
    V.write_section(str(path), "first table")
    text = path.read_text()
    assert text.startswith(original)
    assert text.count(V.BEGIN) == text.count(V.END) == text.count(V.HEADING) == 1
    assert f"{V.BEGIN}\nfirst table\n{V.END}" in text
    path.write_text(text + "\n## later section\n\ntail\n")   # someone adds a section after ours
    V.write_section(str(path), "second table\nrow")
    new = path.read_text()
    assert "first table" not in new and f"{V.BEGIN}\nsecond table\nrow\n{V.END}" in new
    assert new.count(V.BEGIN) == new.count(V.HEADING) == 1
    assert new.startswith(original) and new.endswith("\n## later section\n\ntail\n")


def test_replace_section_refuses_broken_markers():
    with pytest.raises(ValueError, match="expected one"):
        V.replace_section(f"text\n{V.BEGIN}\nno end\n", "body")
    with pytest.raises(ValueError, match="expected one"):
        V.replace_section(f"{V.END}\n{V.BEGIN}\n", "body")
    assert V.replace_section("", "b") == f"{V.HEADING}\n\n{V.BEGIN}\nb\n{V.END}\n"


def test_alternating_medians_take_turns_and_take_the_median():
    calls, values = [], {"a": iter([3.0, 1.0, 2.0]), "x": iter([5.0, 9.0, 4.0]), "b": iter([7.0] * 3)}

    def measure(key):
        def run():
            calls.append(key)
            return next(values[key])
        return run
    order = V.interleave(["a", "b"], ["x"])
    assert order == ["a", "x", "b"]
    med = V.alternating_medians({k: measure(k) for k in order}, repeats=3)
    assert calls == ["a", "x", "b"] * 3
    assert med == {"a": 2.0, "x": 5.0, "b": 7.0}
    assert V.interleave(["a"], ["x", "y", "z"]) == ["a", "x", "y", "z"]
    with pytest.raises(ValueError, match="repeats"):
        V.alternating_medians({"a": lambda: 1.0}, repeats=0)


def test_ratios_against_best_and_partner():
    vs_best, like = V.ratios({"dense": 30.0, "blockwise": 10.0}, {"eager": 40.0, "sdpa": 20.0},
                             (("dense", "eager"), ("blockwise", "sdpa"), ("gone", "sdpa")))
    assert vs_best == {"dense": 1.5, "blockwise": 0.5}
    assert like == {"dense/eager": 0.75, "blockwise/sdpa": 0.5}


def test_decode_measure_is_the_per_token_difference(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(P.time, "perf_counter", lambda: clock[0])

    def gen(n):   # 2 s of prefill and overhead, then 10 ms per token
        clock[0] += 2.0 + 0.01 * n
    assert P._difference(gen)() == pytest.approx(0.01)


def test_next_token_loss_is_mean_shifted_cross_entropy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
    tokens = rng.integers(0, 7, (2, 5)).astype(np.int32)
    logp = logits[:, :-1] - np.log(np.exp(logits[:, :-1]).sum(-1, keepdims=True))
    want = -np.mean(np.take_along_axis(logp, tokens[:, 1:, None], -1))
    got = float(P.next_token_loss(jnp.asarray(logits), jnp.asarray(tokens)))
    assert got == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("name", list(P.PAIRS))
def test_archlab_variants_are_valid_switches(name):
    pair = P.PAIRS[name]
    base = archs.preset(pair.family, "tiny")
    for overrides in pair.variants(all_variants=True)[0].values():
        archs.override(base, **overrides).validate()
    assert pair.seq <= 8192 and set(dict(pair.partners)) <= set(pair.variants(True)[0])


def test_table_marks_a_mismatch():
    row = {"pair": "p", "shape": "train B1×T8", "unit": "ms", "archlab_ms": {"a": 1.0},
           "torch_ms": {"x": 2.0}, "vs_best_torch": {"a": 0.5}, "like_for_like": {"a/x": 0.5},
           "load_before": (1.0, 1.0, 1.0), "load_after": (2.0, 1.0, 1.0), "mismatch": True}
    line = V.table([row]).splitlines()[-1]
    assert line == "| p MISMATCH | train B1×T8 (ms) | a 1.0 | x 2.0 | a 0.50 | a/x 0.50 | 1.0→2.0 |"
