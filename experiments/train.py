"""The train loop, in phases: build -> init/restore -> compile -> loop
(train step, eval, checkpoint, log) -> report.

* Optimizer: optax AdamW (decay on matrices only), linear warmup + cosine decay,
  global-norm clipping. The jitted train step donates the state; AdamW's moments
  are sharded like their parameters (FSDP shards the whole state).
* Loss: cross-entropy on the task's scored positions (``loss_mask``; or all tokens
  with ``train.loss_on_all_tokens``) plus the model's ``aux["losses"]``.
  Non-gradient variables (``state`` collection, e.g. an aux-loss-free router bias)
  are applied mutable and the values the model writes are kept after the optimizer
  step.
* Data: ``experiments.tasks.get_batch`` is pure in (seed, step), generated on device
  with the batch sharded over the mesh; a resumed run sees the same batches and
  the same per-step RNG, so resume is exact.
* Segment mode (``train.segment_len``): each sequence is fed as consecutive
  segments; the model cache (KV cache, recurrent state, Transformer-XL memory) is
  carried between segments under ``stop_gradient`` (truncated BPTT).
* Output in the run directory: ``config.json``, ``metrics.jsonl`` (one JSON object
  per train log / eval row), ``checkpoints/`` (orbax), ``report.md`` + PNGs.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

import archs
from archs.model import RNG_STREAMS, STATE_COLLECTION
from experiments import checkpoint as ckpt_lib
from experiments import mesh as mesh_lib
from experiments.config import ExperimentConfig, config_json, to_jsonable
from experiments.tasks import get_batch


@struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    state: Any  # non-gradient collection; {} when the model has none


def make_optimizer(cfg: ExperimentConfig):
    o, s = cfg.optimizer, cfg.schedule
    warmup = min(s.warmup_steps, max(cfg.train.steps - 1, 0))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=o.lr, warmup_steps=warmup,
        decay_steps=max(cfg.train.steps, warmup + 1), end_value=o.lr * s.final_lr_fraction)
    decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                     mask=decay_mask)
    if o.grad_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip), tx)
    return tx, schedule


def masked_ce(logits, targets, mask):
    """Returns (sum of CE over mask, number of correct scored positions, mask sum)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(correct * mask), jnp.sum(mask)


def forward(model, variables, inputs, *, segment_len, train, rngs=None, mutable=False):
    """Model forward, whole-sequence or segment by segment carrying the cache.

    Returns ``(logits, aux, new_state_collection_or_{})``.
    """
    def apply(x, cache):
        out = model.apply(variables, x, cache=cache, train=train, rngs=rngs, mutable=mutable)
        return out if mutable else (out, {})

    if segment_len is None:
        (logits, aux), new_vars = apply(inputs, None)
        return logits, aux, new_vars.get(STATE_COLLECTION, {})
    b, t = inputs.shape
    cache = model.init_cache(b, t)
    logits, losses, new_vars, aux = [], {}, {}, {}
    for start in range(0, t, segment_len):
        (lg, aux, cache), new_vars = apply(inputs[:, start:start + segment_len], cache)
        cache = jax.lax.stop_gradient(cache)
        logits.append(lg)
        for k, v in aux["losses"].items():
            losses[k] = losses.get(k, 0.0) + v / (t // segment_len)
    aux = {"losses": losses, "metrics": aux["metrics"]}
    return jnp.concatenate(logits, axis=1), aux, new_vars.get(STATE_COLLECTION, {})


def _prepare_run_dir(cfg: ExperimentConfig, out_dir: str, resume: bool, overwrite: bool) -> None:
    cfg_path = os.path.join(out_dir, "config.json")
    exists = os.path.isdir(out_dir) and os.listdir(out_dir)
    if exists and resume:
        if not os.path.isfile(cfg_path):
            raise ValueError(f"--resume: {out_dir} has no config.json; it is not an archlab run directory")
        with open(cfg_path) as f:
            saved = json.load(f)
        now = to_jsonable(cfg)
        # train.steps / eval / logging may change on resume; what defines the run may not.
        for key in ("model", "task", "optimizer", "schedule", "mesh"):
            if saved.get(key) != now[key]:
                raise ValueError(f"--resume: {key} in {cfg_path} differs from the current config; "
                                 "resume needs the same run (use a new --out, or --overwrite)")
        for key in ("seed", "batch_size", "segment_len", "loss_on_all_tokens"):
            if saved["train"].get(key) != now["train"][key]:
                raise ValueError(f"--resume: train.{key}={now['train'][key]!r} differs from the saved "
                                 f"{saved['train'].get(key)!r} in {cfg_path}")
        return
    if exists and not overwrite:
        raise ValueError(f"run directory {out_dir} already exists and is not empty; pass --resume to "
                         "continue it, --overwrite to replace it, or choose another --out")
    if exists and overwrite:
        shutil.rmtree(out_dir)
    if resume and not exists:
        raise ValueError(f"--resume: run directory {out_dir} does not exist")
    os.makedirs(out_dir, exist_ok=True)


def abstract_variables(cfg: ExperimentConfig, model):
    """The model's (boxed, logically annotated) variables as ShapeDtypeStructs; nothing runs."""
    dummy = jax.ShapeDtypeStruct((1, min(cfg.task.seq_len, 8)), jnp.int32)
    return jax.eval_shape(model.init, jax.random.PRNGKey(cfg.train.seed), dummy)


def opt_state_shardings(tx, params, param_shardings, mesh):
    """Shardings of ``tx.init(params)``: every parameter-shaped leaf (AdamW's mu and nu)
    sharded like its parameter, the rest (step counts) replicated.

    Left to XLA, ``jax.jit(tx.init)`` replicates the state (its zeros do not depend on
    the parameters' values, so no sharding propagates): under FSDP each device would
    hold the whole AdamW state.
    """
    abstract = jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())
    return optax.tree_map_params(tx, lambda _, s: s, abstract, param_shardings,
                                 transform_non_params=lambda _: replicated)


def init_state(cfg: ExperimentConfig, model, tx, mesh) -> TrainState:
    """A fresh TrainState, parameters and optimizer state created already sharded
    (call under the mesh and rules)."""
    dummy = jnp.zeros((1, min(cfg.task.seq_len, 8)), jnp.int32)
    var_shardings = mesh_lib.logical_sharding(abstract_variables(cfg, model), mesh, cfg.mesh)
    variables = jax.jit(lambda k: nn.unbox(model.init(k, dummy)), out_shardings=var_shardings)(
        jax.random.PRNGKey(cfg.train.seed))
    params = variables["params"]
    opt_sh = opt_state_shardings(tx, params, var_shardings["params"], mesh)
    return TrainState(jnp.zeros((), jnp.int32), params, jax.jit(tx.init, out_shardings=opt_sh)(params),
                      variables.get(STATE_COLLECTION, {}))


def make_train_step(cfg: ExperimentConfig, model, tx, schedule):
    """The (unjitted) train step ``(TrainState, Batch, rng) -> (TrainState, metrics)``.

    ``archlab run`` and ``archlab aot`` both jit exactly this function through
    :func:`jit_train_step`: loss (CE on scored positions + the model's aux losses),
    gradients, the optimizer update and the non-gradient ``state`` collection.
    """
    seg = cfg.train.segment_len

    def loss_fn(params, ts, batch, rng):
        rngs = {r: jax.random.fold_in(rng, i) for i, r in enumerate(RNG_STREAMS)}
        mutable = [STATE_COLLECTION] if ts.state else False
        variables = {"params": params, **({STATE_COLLECTION: ts.state} if ts.state else {})}
        logits, aux, new_state = forward(model, variables, batch.inputs, segment_len=seg,
                                         train=True, rngs=rngs, mutable=mutable)
        mask = jnp.ones_like(batch.loss_mask) if cfg.train.loss_on_all_tokens else batch.loss_mask
        nll, _, n = masked_ce(logits, batch.targets, mask)
        _, correct, n_scored = masked_ce(logits, batch.targets, batch.loss_mask)
        ce = nll / jnp.maximum(n, 1.0)
        aux_total = sum(aux["losses"].values()) if aux["losses"] else 0.0
        metrics = {"loss": ce + aux_total, "ce": ce, "accuracy": correct / jnp.maximum(n_scored, 1.0),
                   **{f"aux/{k}": v for k, v in aux["losses"].items()},
                   **{f"diag/{k}": v for k, v in aux["metrics"].items()}}
        return ce + aux_total, (metrics, new_state)

    def train_step(ts: TrainState, step_batch, rng):
        (_, (metrics, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            ts.params, ts, step_batch, rng)
        updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        metrics["grad_norm"] = optax.tree.norm(grads) if hasattr(optax, "tree") else optax.global_norm(grads)
        metrics["lr"] = schedule(ts.step)
        new_state = new_state if ts.state else ts.state
        return TrainState(ts.step + 1, params, opt_state, new_state), metrics

    return train_step


def jit_train_step(train_step, state_shardings):
    """``jax.jit`` of a train step: the state is donated and keeps ``state_shardings``."""
    return jax.jit(train_step, donate_argnums=0, out_shardings=(state_shardings, None))


def run(cfg: ExperimentConfig, out_dir: str, *, resume: bool = False, overwrite: bool = False,
        progress: bool = True, devices=None, write_report: bool = True) -> dict[str, Any]:
    """Trains ``cfg`` into ``out_dir`` and returns a summary dict (final metrics)."""
    b = _build(cfg, out_dir, resume, overwrite, devices)
    with mesh_lib.mesh_context(b.mesh), nn.logical_axis_rules(mesh_lib.rules(cfg.mesh)):
        state, start_step, ckpt = _init_or_restore(cfg, b, out_dir, resume)
        n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(state.params)))
        train_step, make_batch, evaluator = _compile(cfg, b, state)
        final_eval, tok_s = _loop(cfg, out_dir, state, start_step, ckpt, train_step, make_batch,
                                  evaluator, progress)
    return _report(cfg, out_dir, n_params, final_eval, tok_s, write_report)


class _Built(NamedTuple):
    """What the build phase produces."""
    mesh: Any
    model: Any
    eval_model: Any
    tx: Any
    schedule: Any
    batch_shard: Any


def _build(cfg: ExperimentConfig, out_dir: str, resume: bool, overwrite: bool, devices) -> _Built:
    """Build phase: everything validated before anything compiles; the run directory prepared."""
    cfg.validate()
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    check_batch_divisible(cfg, mesh)
    model = archs.build(cfg.model)
    eval_model = _eval_model(cfg, model)
    _prepare_run_dir(cfg, out_dir, resume, overwrite)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        f.write(config_json(cfg))
    tx, schedule = make_optimizer(cfg)
    return _Built(mesh, model, eval_model, tx, schedule, mesh_lib.batch_sharding(mesh, cfg.mesh))


def check_batch_divisible(cfg: ExperimentConfig, mesh) -> None:
    """ValueError unless the train and eval batch sizes divide over the data-parallel axes."""
    dp = mesh_lib.batch_axis_size(mesh, cfg.mesh)
    for path, bsz in (("train.batch_size", cfg.train.batch_size), ("eval.batch_size", cfg.eval.batch_size)):
        if bsz % dp:
            raise ValueError(f"{path}={bsz} must be divisible by the data-parallel size {dp} "
                             f"(mesh {dict(mesh.shape)})")


def _init_or_restore(cfg: ExperimentConfig, b: _Built, out_dir: str, resume: bool):
    """Init phase (sharded from the start) or restore from the latest checkpoint."""
    state = init_state(cfg, b.model, b.tx, b.mesh)
    ckpt = ckpt_lib.Checkpointer(os.path.join(out_dir, "checkpoints"), cfg.train.keep_checkpoints)
    start_step = 0
    if resume:
        last = ckpt.latest_step()
        if last is None:
            raise ValueError(f"--resume: no checkpoint in {out_dir}/checkpoints")
        state = ckpt.restore(last, ckpt_lib.abstract_like(state))
        start_step = int(state.step)
    _truncate_metrics(out_dir, start_step)
    return state, start_step, ckpt


def _compile(cfg: ExperimentConfig, b: _Built, state: TrainState):
    """Compile phase: the jitted train step, batch maker and evaluator."""
    state_shard = jax.tree.map(lambda x: x.sharding, state)
    train_step = jit_train_step(make_train_step(cfg, b.model, b.tx, b.schedule), state_shard)
    make_batch = jax.jit(lambda step: get_batch(cfg.task, cfg.train.seed, step, cfg.train.batch_size),
                         out_shardings=b.batch_shard)
    evaluator = _Evaluator(cfg, b.eval_model, b.batch_shard, cfg.train.segment_len)
    return train_step, make_batch, evaluator


def _loop(cfg: ExperimentConfig, out_dir, state, start_step, ckpt, train_step, make_batch,
          evaluator, progress):
    """Loop phase: train steps, logging, eval and checkpoints. Returns (final eval, tokens/s)."""
    log = open(os.path.join(out_dir, "metrics.jsonl"), "a")
    bar = _progress(progress, start_step, cfg.train.steps, cfg.name)
    tokens_per_step = cfg.train.batch_size * cfg.task.seq_len
    t_last, steps_since, tok_s = time.perf_counter(), 0, float("nan")
    final_eval: dict[int, float] = {}
    base_rng = jax.random.PRNGKey(cfg.train.seed + 1)
    for step in range(start_step, cfg.train.steps):
        state, metrics = train_step(state, make_batch(step), jax.random.fold_in(base_rng, step))
        steps_since += 1
        done = step + 1
        if done % cfg.train.log_every == 0 or done == cfg.train.steps:
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            if step > start_step:  # exclude the compile step from throughput
                tok_s = tokens_per_step * steps_since / (now - t_last)
            t_last, steps_since = now, 0
            row = {"split": "train", "step": done, "tokens_per_s": tok_s,
                   **{k: _jsonable(v) for k, v in metrics.items()}}
            log.write(json.dumps(row) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}", tok_s=f"{tok_s:,.0f}")
        if done % cfg.eval.every == 0 or done == cfg.train.steps:
            final_eval = evaluator(state)
            for length, (acc, loss) in final_eval.items():
                log.write(json.dumps({"split": "eval", "step": done, "length": length,
                                      "accuracy": acc, "loss": loss}) + "\n")
            log.flush()
            t_last = time.perf_counter()  # eval time is not train throughput
        if (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0) or done == cfg.train.steps:
            ckpt.save(done, state)
        bar.update(1)
    bar.close()
    log.close()
    ckpt.close()
    return final_eval, tok_s


def _report(cfg: ExperimentConfig, out_dir, n_params, final_eval, tok_s, write_report) -> dict[str, Any]:
    """Report phase: ``summary.json`` and (optionally) ``report.md``."""
    summary = {"name": cfg.name, "params": n_params, "steps": cfg.train.steps,
               "eval": {int(k): v[0] for k, v in final_eval.items()}, "tokens_per_s": tok_s}
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    if write_report:
        from experiments import report
        report.write_report([out_dir], out_dir)
    return summary


def _eval_model(cfg: ExperimentConfig, model):
    """The model used for evaluation: ``cfg.eval.model`` when set, after checking (shapes
    only, nothing compiles) that it takes the trained parameters unchanged."""
    if cfg.eval.model is None:
        return model
    eval_model = archs.build(cfg.eval.model)
    dummy, key = jnp.zeros((1, min(cfg.task.seq_len, 8)), jnp.int32), jax.random.PRNGKey(0)
    abstract = jax.eval_shape(model.init, key, dummy)
    got = jax.eval_shape(eval_model.init, key, dummy)
    shapes = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(x.dtype)), nn.unbox(tree))
    if shapes(abstract) != shapes(got):  # nested dicts: compares structure and leaves
        raise ValueError(f"eval.model ({cfg.eval.model.name!r}) does not take the trained parameters "
                         "unchanged: its variables differ in structure, shape or dtype from model's. "
                         "Only parameter-free changes (position scaling, window, impl) are allowed")
    return eval_model


class _Evaluator:
    """Accuracy and loss on scored positions, per evaluation length, on a fixed eval set."""

    def __init__(self, cfg: ExperimentConfig, model, batch_shard, seg):
        self.cfg, self.model, self.shard, self.seg = cfg, model, batch_shard, seg
        self.steps = {}
        for length in cfg.eval_lengths:
            task = cfg.task.for_eval(length)
            self.steps[length] = (
                jax.jit(lambda i, task=task: get_batch(task, cfg.train.seed, i, cfg.eval.batch_size, "eval"),
                        out_shardings=batch_shard),
                jax.jit(self._eval_step))

    def _eval_step(self, ts: TrainState, batch):
        variables = {"params": ts.params, **({STATE_COLLECTION: ts.state} if ts.state else {})}
        seg = self.seg if self.seg and batch.inputs.shape[1] % self.seg == 0 else None
        logits, _, _ = forward(self.model, variables, batch.inputs, segment_len=seg, train=False)
        return masked_ce(logits, batch.targets, batch.loss_mask)

    def __call__(self, ts: TrainState) -> dict[int, tuple[float, float]]:
        out = {}
        for length, (make, step) in self.steps.items():
            nll = correct = n = 0.0
            for i in range(self.cfg.eval.batches):
                a, b, c = jax.device_get(step(ts, make(i)))
                nll, correct, n = nll + float(a), correct + float(b), n + float(c)
            out[length] = (correct / max(n, 1.0), nll / max(n, 1.0))
        return out


def _jsonable(v):
    v = np.asarray(v)
    return float(v) if v.ndim == 0 else v.tolist()


def _truncate_metrics(out_dir: str, step: int) -> None:
    """Drops metric rows after ``step`` (a resumed run rewrites them identically)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(rows)


class _NoBar:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def close(self): pass


def _progress(enabled: bool, start: int, total: int, name: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc=name, dynamic_ncols=True, mininterval=1.0)
