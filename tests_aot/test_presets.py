"""Every preset's tiny training step compiles deviceless for TPU v5e and H100; the
sharded step (data x FSDP x tensor / expert) compiles with the collectives it needs;
and ``archlab aot`` compiles exactly the program ``archlab run`` jits."""

import flax.linen as nn
import jax
import pytest

import archs
from experiments import mesh as mesh_lib
from experiments import train
from experiments.aot import compile as compile_lib
from experiments.aot import runner
from tests_aot.conftest import GPU, TPU


def _tiny(name, n_devices, *overrides):
    sets = ["task.seq_len=64", "model.max_len=128", f"train.batch_size={max(2, n_devices)}",
            f"eval.batch_size={max(2, n_devices)}", *overrides]
    return runner.resolve(f"{name}:tiny", n_devices, sets)[0]


@pytest.mark.parametrize("spec", [TPU, GPU], ids=["v5e", "h100"])
@pytest.mark.parametrize("name", archs.names())
def test_preset_tiny_train_step_compiles(compile_target, name, spec):
    target, devices = compile_target(spec)
    if not archs.preset(name, "tiny").causal:
        # Bidirectional presets (Linformer) have no next-token training step: archlab run
        # refuses them before compiling, and aot compiles only what run would run.
        with pytest.raises(ValueError, match="not causal"):
            _tiny(name, len(devices))
        return
    cfg = _tiny(name, len(devices))
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    out = compile_lib.compile_train(cfg, mesh, target)
    param_bytes = 4 * out["params"]  # fp32 parameters
    # The state (params + AdamW mu and nu) is an argument of the step, and donated.
    assert out["memory"]["argument_bytes"] >= 3 * param_bytes
    assert out["memory"]["alias_bytes"] >= 3 * param_bytes
    assert out["fits"] and out["model_flops"] > 0


@pytest.mark.parametrize("spec", ["tpu:v5e-8", "gpu:8xh100"], ids=["v5e-8", "8xh100"])
@pytest.mark.parametrize("name,mesh,need", [
    ("llama", ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"), {"all-gather"}),
    ("mixtral", ("mesh.data=2", "mesh.fsdp=2", "mesh.expert=2"), {"all-gather", "all-to-all"}),
    # Pallas kernels cannot be partitioned by GSPMD: the layers run them per batch/head shard
    # in shard_map (attention: the backend's own flash kernel; MoE: dropless grouped matmul)
    ("llama", ("mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2",
               "model.pattern.0.mixer.attn_impl='pallas'"), {"all-gather"}),
    ("mixtral", ("mesh.data=4", "mesh.fsdp=2"), {"all-gather"}),
], ids=["llama", "mixtral-ep", "llama-flash-kernel", "mixtral-dropless-fsdp"])
def test_sharded_train_and_decode_compile(compile_target, spec, name, mesh, need):
    target, devices = compile_target(spec)
    cfg = _tiny(name, 8, *mesh)
    row = runner.compile_run(cfg, target, devices)
    assert "error" not in row["train"], row["train"]
    kinds = {c["kind"] for c in row["train"]["collectives"]}
    assert need <= kinds, kinds
    assert kinds & {"all-reduce", "reduce-scatter"}, kinds  # gradients reduced over data
    assert "error" not in row["decode"] and row["decode"]["fits"], row["decode"]


def test_aot_compiles_the_program_run_jits():
    """On a CPU mesh, lowering with aot's abstract arguments and with run's concrete
    state gives the same StableHLO (same step function, optimizer, shardings, donation)."""
    cfg = _tiny("deepseek_moe", 1)  # has a non-gradient state collection and aux losses
    devices = jax.devices("cpu")[:1]
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    model = archs.build(cfg.model)
    tx, schedule = train.make_optimizer(cfg)
    (state, batch, rng), _ = compile_lib.abstract_train_args(cfg, model, tx, mesh)
    with mesh_lib.mesh_context(mesh), nn.logical_axis_rules(mesh_lib.rules(cfg.mesh)):
        concrete = train.init_state(cfg, model, tx, mesh)
        step = train.make_train_step(cfg, model, tx, schedule)
        ours = train.jit_train_step(step, jax.tree.map(lambda x: x.sharding, state)).lower(state, batch, rng)
        theirs = train.jit_train_step(step, jax.tree.map(lambda x: x.sharding, concrete)).lower(
            concrete, batch, jax.random.PRNGKey(0))
    assert ours.as_text() == theirs.as_text()
