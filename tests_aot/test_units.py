"""Target parsing, the GPU target config, HLO collective counting and model FLOPs."""

import json

import pytest

import archs
from experiments import cli
from experiments.aot import estimate, hlo, runner, targets


@pytest.mark.parametrize("spec,n,hosts,topology", [
    ("tpu:v5p-8", 4, 1, "v5p:2x2x1"), ("tpu:v5p-64", 32, 8, "v5p:2x4x4"),
    ("tpu:v5e-8", 8, 1, "v5e:2x4"), ("tpu:v6e-256", 256, 32, "v6e:16x16"),
    ("tpu:v4-8", 8, 1, "v4:2x2x1"),
    ("gpu:h100", 1, 1, "1x1x1"), ("gpu:8xh100", 8, 1, "1x1x8"), ("gpu:2x8xb200", 16, 2, "1x2x8")])
def test_parse_target(spec, n, hosts, topology):
    t = targets.parse_target(spec)
    assert (t.n_devices, t.hosts, t.topology) == (n, hosts, topology)


@pytest.mark.parametrize("spec,msg", [
    ("tpu:v9-8", "unknown TPU"), ("tpu:v5p-7", "multiple"), ("tpu:v5p-6", "slice shape"), ("tpu:v5e-3", "slice shape"),
    ("gpu:h900", "unknown GPU"), ("gpu:16xh100", "per host"), ("npu:x", "unknown platform")])
def test_parse_target_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        targets.parse_target(spec)


@pytest.mark.parametrize("spec", ["tpu:v5p-8", "tpu:v5e-8", "tpu:v4-8", "gpu:2x8xh100", "gpu:a100",
                                  "gpu:h200", "gpu:b200"])
def test_compile_only_devices(compile_target, spec):
    t, devices = compile_target(spec)
    assert len(devices) == t.n_devices
    kind = devices[0].device_kind
    assert kind == t.chip.device_kind, (kind, t.chip.device_kind)


def test_gpu_target_config_fields():
    text = targets.gpu_target_config(targets.CHIPS["h100"])
    assert "core_count: 132" in text and "major: 9 minor: 0" in text
    assert 'device_description_str: "NVIDIA H100 80GB HBM3"' in text


HLO = """HloModule m, entry_computation_layout={()->()}

%body (p: (s32[], bf16[8,128])) -> (s32[], bf16[8,128]) {
  %p = (s32[], bf16[8,128]) parameter(0)
  %x = bf16[8,128]{1,0} get-tuple-element(%p), index=1
  %ag = bf16[32,128]{1,0} all-gather(%x), channel_id=1, replica_groups=[1,4]<=[4], dimensions={0}
  %ar = f32[16]{0} all-reduce(%y), channel_id=2, replica_groups={{0,1},{2,3}}, to_apply=%add
  ROOT %t = (s32[], bf16[8,128]) tuple(%i, %x)
}

%cond (p: (s32[], bf16[8,128])) -> pred[] {
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: bf16[8,128]) -> bf16[8,128] {
  %a = bf16[8,128]{1,0} parameter(0)
  %w = (s32[], bf16[8,128]) while(%t0), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  %rs = bf16[2,128]{1,0} reduce-scatter(%a), channel_id=3, replica_groups=[1,4]<=[4], dimensions={0}
  ROOT %r = bf16[8,128]{1,0} get-tuple-element(%w), index=1
}
"""


def test_collectives_count_loop_trips_and_bytes():
    got = {c["kind"]: c for c in hlo.collectives(HLO, 4)}
    assert got["all-gather"]["count"] == 5 and got["all-gather"]["bytes"] == 5 * 32 * 128 * 2
    assert got["all-gather"]["ring_bytes"] == pytest.approx(5 * 32 * 128 * 2 * 3 / 4)
    assert got["all-reduce"]["count"] == 5 and got["all-reduce"]["ring_bytes"] == pytest.approx(5 * 64 * 2 * 1 / 2)
    assert got["reduce-scatter"]["count"] == 1 and got["reduce-scatter"]["ring_bytes"] == 3 * 2 * 128 * 2
    cross = hlo.collectives(HLO, 4, devices_per_host=2)
    assert {(c["kind"], c["cross_host"]) for c in cross} == {
        ("all-gather", True), ("all-reduce", False), ("reduce-scatter", True)}


def test_train_flops_llama_matches_hand_formula():
    cfg = archs.preset("llama", "8b")
    d, l, v, f = 4096, 32, 128256, 14336
    n = l * (d * d * 2 + 2 * d * 1024 + 3 * d * f + 2 * d) + d + d * v  # attn, ffn, norms; head
    model = archs.build(cfg)
    import jax
    import jax.numpy as jnp
    boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))["params"]
    total, active = estimate.matmul_params(cfg, boxed)
    assert total == n + v * d and active == n  # the input table is a lookup, not a matmul
    flops = estimate.train_flops(cfg, active, 2, 8192)
    assert flops == pytest.approx(2 * 8192 * (6 * n + 12 * l * 32 * 128 * 4096))


def test_moe_active_fraction():
    import jax
    import jax.numpy as jnp
    cfg = archs.preset("mixtral", "tiny")  # tied embeddings: the table counts once, as the head
    boxed = jax.eval_shape(archs.build(cfg).init, jax.random.PRNGKey(0),
                           jnp.zeros((1, 8), jnp.int32))["params"]
    total, active = estimate.matmul_params(cfg, boxed)
    moe = cfg.pattern[0].ffn
    expert = cfg.n_layers * 3 * cfg.d_model * moe.hidden * moe.n_experts  # SwiGLU experts
    assert active == pytest.approx(total - expert * (1 - moe.top_k / moe.n_experts))


def test_cli_errors_before_compiling(capsys):
    assert cli.main(["aot", "llama:tiny", "--target", "tpu:v9-8"]) == 2
    assert "unknown TPU" in capsys.readouterr().err
    assert cli.main(["aot", "llama:tiny", "--target", "gpu:8xh100", "--set", "mesh.fsdp=3",
                     "--set", "mesh.data=-1"]) == 2
    assert "not divisible" in capsys.readouterr().err
    assert cli.main(["aot", "llama:tiny", "--target", "gpu:8xh100", "--set", "mesh.fsdp=4"]) == 2
    assert "use 4 devices but 8" in capsys.readouterr().err
    assert cli.main(["aot", "llama:tiny", "--target", "gpu:8xh100", "--set", "train.batch_size=4"]) == 2
    assert "divisible by the data-parallel size 8" in capsys.readouterr().err


def test_cli_compiles_and_writes_json(tmp_path, capsys):
    out = tmp_path / "aot.json"
    rc = cli.main(["aot", "llama:tiny", "--target", "tpu:v5e-4", "--set", "task.seq_len=64",
                   "--json", str(out)])
    text = capsys.readouterr().out
    assert rc == 0, text
    row = json.loads(out.read_text())[0]
    assert row["mesh"]["fsdp"] == 4 and row["train"]["fits"] and row["decode"]["fits"]
    assert "| llama-tiny | tpu:v5e-4 | fsdp4 | 64 | 4 |" in text
    assert {c["kind"] for c in row["train"]["collectives"]} >= {"all-gather"}
    assert runner.markdown([row]).count("\n") == 2


def test_compiler_oom_becomes_a_does_not_fit_row():
    def boom():
        raise RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory on HBM, "
                           "the total memory required for HLO temporaries (173.46G) exceeds "
                           "available HBM (95.73G).")
    row = runner._attempt(boom)
    assert row["fits"] is False and not row["does_not_compile"]
    assert row["required_bytes"] == pytest.approx(173.46 * 2 ** 30)
    assert row["available_bytes"] == pytest.approx(95.73 * 2 ** 30)
    broken = runner._attempt(lambda: (_ for _ in ()).throw(RuntimeError("INTERNAL: Mosaic failed")))
    assert broken["does_not_compile"] and broken["fits"] is None
    with pytest.raises(ValueError):  # configuration errors are not findings
        runner._attempt(lambda: (_ for _ in ()).throw(ValueError("bad")))


def test_fsdp_shards_the_optimizer_state_like_the_parameters(compile_target):
    import jax
    from experiments import mesh as mesh_lib
    from experiments import train
    from experiments.aot import compile as compile_lib
    _, devices = compile_target("tpu:v5e-8")
    cfg = runner.resolve("llama:tiny", 8, ["task.seq_len=64"])[0]
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    model = archs.build(cfg.model)
    tx, _ = train.make_optimizer(cfg)
    (state, _, _), _ = compile_lib.abstract_train_args(cfg, model, tx, mesh)
    table = state.params["embed"]["table"].sharding.spec
    specs = [x.sharding.spec for x in jax.tree.leaves(state.opt_state) if x.shape == (256, 64)]
    assert tuple(table) == ("tensor", "fsdp") and specs and all(s == table for s in specs), specs
