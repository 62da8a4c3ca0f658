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

import os
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
from experiments import memcheck, rundir
from experiments import mesh as mesh_lib
from experiments.config import ExperimentConfig, config_json
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
        (loss, (metrics, new_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            ts.params, ts, step_batch, rng)
        updates, opt_state = tx.update(grads, ts.opt_state, ts.params)
        params = optax.apply_updates(ts.params, updates)
        metrics["grad_norm"] = _global_norm(grads)
        metrics["lr"] = schedule(ts.step)
        new_state = new_state if ts.state else ts.state
        # A non-finite loss, gradient or update is never applied: the state stays finite
        # (the loop stops, or counts the step as skipped: train.on_nonfinite).
        finite = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"]) & _all_finite(params)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        metrics["nonfinite"] = (~finite).astype(jnp.int32)
        return TrainState(ts.step + 1, keep(params, ts.params), keep(opt_state, ts.opt_state),
                          keep(new_state, ts.state)), metrics

    return train_step


def _all_finite(tree):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def _global_norm(tree):
    return optax.tree.norm(tree) if hasattr(optax, "tree") else optax.global_norm(tree)


def jit_train_step(train_step, state_shardings):
    """``jax.jit`` of a train step: the state is donated and keeps ``state_shardings``."""
    return jax.jit(train_step, donate_argnums=0, out_shardings=(state_shardings, None))


class NonFiniteError(RuntimeError):
    """Training diverged (non-finite loss, gradient norm or update) under on_nonfinite='stop'."""


def run(cfg: ExperimentConfig, out_dir: str, *, resume: bool = False, overwrite: bool = False,
        progress: bool = True, devices=None, write_report: bool = True,
        init_from: str | None = None) -> dict[str, Any]:
    """Trains ``cfg`` into ``out_dir`` and returns the summary (rebuilt from the run's files).
    ``init_from``: a directory made by ``archlab convert`` whose parameters replace the
    fresh initialization (not with ``resume``; see :func:`with_init_params`).

    Resuming a run whose last checkpoint already reached ``train.steps`` trains nothing
    and changes nothing but the rebuilt summary.
    """
    b = _build(cfg, out_dir, resume, overwrite, devices)
    n_params = int(sum(np.prod(x.shape) for x in jax.tree.leaves(
        nn.unbox(abstract_variables(cfg, b.model))["params"])))
    ckpt = ckpt_lib.Checkpointer(os.path.join(out_dir, "checkpoints"), cfg.train.keep_checkpoints)
    last = ckpt.latest_step() if resume else None
    if last is not None and last >= cfg.train.steps:
        try:
            ckpt.verify(last)   # the summary stands on the final checkpoint: refuse a damaged one
        finally:
            ckpt.close()
        print(f"[{cfg.name}] {out_dir} is complete (checkpoint step {last}, train.steps="
              f"{cfg.train.steps}); nothing to train. Raise train.steps to continue it.")
        return _report(cfg, out_dir, n_params, last, write_report)
    with mesh_lib.mesh_context(b.mesh), nn.logical_axis_rules(mesh_lib.rules(cfg.mesh)):
        state, start_step = _init_or_restore(cfg, b, out_dir, ckpt, resume)
        if init_from and not resume:
            state = with_init_params(state, init_from)
        train_step, make_batch, evaluator = _compile(cfg, b, state)
        _loop(cfg, out_dir, state, start_step, ckpt, train_step, make_batch, evaluator, progress)
    return _report(cfg, out_dir, n_params, cfg.train.steps, write_report)


class _Built(NamedTuple):
    """What the build phase produces."""
    mesh: Any
    model: Any
    eval_model: Any
    tx: Any
    schedule: Any
    batch_shard: Any


def _build(cfg: ExperimentConfig, out_dir: str, resume: bool, overwrite: bool, devices) -> _Built:
    """Build phase: everything validated before anything compiles; the run directory
    prepared (a fresh run's ``config.json`` written; a resumed one's only once restored)."""
    cfg.validate()
    mesh = mesh_lib.make_mesh(cfg.mesh, devices)
    check_batch_divisible(cfg, mesh)
    model = archs.build(cfg.model)
    eval_model = _eval_model(cfg, model)
    rundir.prepare(cfg, out_dir, resume, overwrite)
    if not resume:
        rundir.write_atomic(os.path.join(out_dir, "config.json"), config_json(cfg))
    tx, schedule = make_optimizer(cfg)
    return _Built(mesh, model, eval_model, tx, schedule, mesh_lib.batch_sharding(mesh, cfg.mesh))


def check_batch_divisible(cfg: ExperimentConfig, mesh) -> None:
    """ValueError unless the train and eval batch sizes divide over the data-parallel axes."""
    dp = mesh_lib.batch_axis_size(mesh, cfg.mesh)
    for path, bsz in (("train.batch_size", cfg.train.batch_size), ("eval.batch_size", cfg.eval.batch_size)):
        if bsz % dp:
            raise ValueError(f"{path}={bsz} must be divisible by the data-parallel size {dp} "
                             f"(mesh {dict(mesh.shape)})")


def with_init_params(state: TrainState, init_from: str) -> TrainState:
    """``state`` with the parameters of a converted checkpoint (experiments/convert.py),
    restored with the fresh parameters' shapes, dtypes and shardings."""
    from experiments import convert
    state = state.replace(params=convert.init_params(init_from, state.params))
    converted = convert.init_state(init_from, state.state)   # e.g. DeepSeek-V3's router bias
    return state if converted is None else state.replace(state=converted)


def _init_or_restore(cfg: ExperimentConfig, b: _Built, out_dir: str, ckpt, resume: bool):
    """Init phase (sharded from the start) or restore from the latest checkpoint; a resumed
    run's ``config.json`` is rewritten only after its checkpoint restored."""
    state = init_state(cfg, b.model, b.tx, b.mesh)
    start_step = 0
    if resume:
        last = ckpt.latest_step()
        if last is None:
            raise ValueError(f"--resume: no checkpoint in {out_dir}/checkpoints")
        state = ckpt.restore(last, ckpt_lib.abstract_like(state))
        start_step = int(state.step)
    rundir.truncate_metrics(out_dir, start_step)
    if resume:
        rundir.write_atomic(os.path.join(out_dir, "config.json"), config_json(cfg))
    return state, start_step


def _compile(cfg: ExperimentConfig, b: _Built, state: TrainState):
    """Compile phase: the train step compiled ahead of running it (its memory checked
    against what the devices have), batch maker and evaluator."""
    state_shard = jax.tree.map(lambda x: x.sharding, state)
    jitted = jit_train_step(make_train_step(cfg, b.model, b.tx, b.schedule), state_shard)
    make_batch = jax.jit(lambda step: get_batch(cfg.task, cfg.train.seed, step, cfg.train.batch_size),
                         out_shardings=b.batch_shard)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=b.batch_shard),
                         jax.eval_shape(make_batch, 0))
    rng = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    compiled = jitted.lower(ckpt_lib.abstract_like(state), batch, rng).compile()
    memcheck.check_fits(compiled, "train step", b.mesh)
    evaluator = _Evaluator(cfg, b.eval_model, b.batch_shard, cfg.train.segment_len)
    return compiled, make_batch, evaluator


def _loop(cfg: ExperimentConfig, out_dir, state, start_step, ckpt, train_step, make_batch,
          evaluator, progress):
    """Loop phase: train steps, logging, eval and checkpoints (each save only after every
    step before it was checked finite)."""
    log = rundir.MetricsLog(out_dir, cfg.train.batch_size * cfg.task.seq_len)
    guard = _Divergence(cfg.train.on_nonfinite, ckpt)
    bar = _progress(progress, start_step, cfg.train.steps, cfg.name)
    base_rng = jax.random.PRNGKey(cfg.train.seed + 1)
    try:
        for step in range(start_step, cfg.train.steps):
            rng = jax.random.fold_in(base_rng, step)
            if jax.process_count() > 1:   # a host value is taken as replicated on every process
                rng = np.asarray(rng)
            state, metrics = train_step(state, make_batch(step), rng)
            done = step + 1
            guard.after_step(done, metrics)
            log.step_done()
            last = done == cfg.train.steps
            if done % cfg.train.log_every == 0 or last:
                guard.check_all()
                row = log.train_row(done, metrics, guard.take_skipped(), first=step == start_step)
                bar.set_postfix(loss=f"{row['loss']:.3f}", acc=f"{row['accuracy']:.3f}")
            if done % cfg.eval.every == 0 or last:
                guard.check_all()
                log.eval_rows(done, evaluator(state))
            if (cfg.train.checkpoint_every and done % cfg.train.checkpoint_every == 0) or last:
                guard.check_all()
                ckpt.save(done, state)
            bar.update(1)
    finally:
        bar.close()
        log.close()
        ckpt.close()


class _Divergence:
    """Watches each step's non-finite flag one step behind (no per-step host sync);
    ``check_all`` syncs before anything is logged, evaluated or saved."""

    def __init__(self, mode: str, ckpt):
        self.mode, self.ckpt, self.pending, self.skipped = mode, ckpt, [], None

    def after_step(self, done, metrics):
        if self.mode == "skip_step":
            flag = metrics["nonfinite"]
            self.skipped = flag if self.skipped is None else self.skipped + flag
            return
        self.pending.append((done, metrics))
        if len(self.pending) > 1:
            self._check(self.pending.pop(0))

    def check_all(self):
        while self.pending:
            self._check(self.pending.pop(0))

    def take_skipped(self):
        if self.mode != "skip_step":
            return None
        n, self.skipped = int(jax.device_get(self.skipped)), None
        return n

    def _check(self, item):
        done, metrics = item
        if not bool(jax.device_get(metrics["nonfinite"])):
            return
        loss, gnorm = (float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm"))
        self.ckpt.wait()
        last = self.ckpt.latest_step()
        where = (f"the last finite checkpoint is step {last} ({self.ckpt.step_dir(last)}); --resume "
                 "continues from it" if last is not None else "no checkpoint was saved before it")
        raise NonFiniteError(
            f"training diverged at step {done}: loss={loss}, grad_norm={gnorm} (or the updated "
            "parameters) is not finite; stopped (train.on_nonfinite='stop'), the step's update was "
            f"not applied and nothing after it was saved; {where}. Lower optimizer.lr / raise "
            "warmup, or set train.on_nonfinite='skip_step'")


def _report(cfg: ExperimentConfig, out_dir, n_params, final_step, write_report) -> dict[str, Any]:
    """Report phase: ``summary.json`` rebuilt from metrics.jsonl and the final checkpoint
    step, and (optionally) ``report.md``."""
    summary = rundir.build_summary(out_dir, cfg.name, n_params, final_step)
    if write_report and rundir.is_writer():
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


class _NoBar:
    def update(self, n): pass
    def set_postfix(self, **kw): pass
    def close(self): pass


def _progress(enabled: bool, start: int, total: int, name: str):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=start, desc=name, dynamic_ncols=True, mininterval=1.0)
