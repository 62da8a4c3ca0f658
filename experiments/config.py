"""Experiment configuration: frozen dataclasses, the experiment-file loader, ``--set``
overrides, JSON serialization and validation before anything compiles.

An experiment file (``experiments/configs/*.py``) starts with a docstring (the
command and the expected result) and defines ``get_config(smoke=False)`` and/or
``get_sweep(smoke=False)`` returning ``ExperimentConfig`` / a list of them.
``--set a.b=value`` parses ``value`` with ``ast.literal_eval`` (never ``eval``);
tuples in a path are indexed by position (``model.pattern.0.mixer.attn_impl='blockwise'``).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import json
import math
import os
import re
import traceback
import types
import typing
from typing import Any

from archs.config import ModelConfig
from layers.contracts import in_range
from experiments.tasks import TaskConfig


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW (Loshchilov & Hutter 2019) with global-norm clipping."""
    lr: float = 1e-3
    weight_decay: float = 0.1      # applied to matrices (ndim >= 2) only
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    grad_clip: float = 1.0         # global norm; 0 disables


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """Linear warmup then cosine decay to ``final_lr_fraction * lr``."""
    warmup_steps: int = 50
    final_lr_fraction: float = 0.1


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh axes (size -1 fills the remaining devices) and logical->mesh rules.

    ``rules`` maps each logical axis name used by the model to a mesh axis, a tuple
    of mesh axes, or None (replicated). Model code names only logical axes.
    """
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    rules: tuple[tuple[str, Any], ...] = (
        ("batch", ("data", "fsdp", "expert")),
        ("length", None), ("act_embed", None),
        ("embed", "fsdp"), ("vocab", "tensor"),
        ("mlp", "tensor"), ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None),
        ("expert", "expert"), ("layers", None), ("norm", None), ("conv", None), ("state", None),
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 64
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0      # 0: only the final checkpoint
    keep_checkpoints: int = 2
    segment_len: int | None = None  # split sequences into segments carrying the cache (Transformer-XL / TBPTT)
    loss_on_all_tokens: bool = False  # False: loss only on scored positions (Zoology setting)
    on_nonfinite: str = "stop"     # non-finite loss/grad norm: "stop" the run, or "skip_step" (update not applied)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    every: int = 100               # evaluate every N steps (and at the end)
    lengths: tuple[int, ...] = ()  # evaluation sequence lengths; () = the training length
    batches: int = 4
    batch_size: int = 64
    # Evaluate with this model config instead of ``ExperimentConfig.model`` (the trained
    # parameters are reused, so its parameter tree must match): e.g. plain RoPE in
    # training and PI / NTK / YaRN scaling switched on at inference (the zero-shot
    # length-extrapolation recipe). None = the training model.
    model: ModelConfig | None = None


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    name: str
    model: ModelConfig
    task: TaskConfig
    optimizer: OptimizerConfig = OptimizerConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    mesh: MeshConfig = MeshConfig()
    cell: str = ""                 # runs sharing a cell (e.g. the lrs of one setting); report keeps the best
    arch: str = ""                 # label in reports/plots; "" = model.name

    @property
    def eval_lengths(self) -> tuple[int, ...]:
        return self.eval.lengths or (self.task.seq_len,)

    def validate(self) -> None:
        """Everything checkable without compiling; ValueError names field, value, allowed."""
        check_run_name("name", self.name)
        if not isinstance(self.model, ModelConfig):
            raise ValueError(f"model must be a ModelConfig (e.g. archs.preset(...)), got {type(self.model).__name__}")
        if not isinstance(self.task, TaskConfig):
            raise ValueError(f"task must be a TaskConfig (experiments.tasks.make_task(...)), got {type(self.task).__name__}")
        self.model.validate("model")
        self.task.validate("task")
        if self.model.vocab_size < self.task.vocab_size:
            raise ValueError(f"model.vocab_size={self.model.vocab_size} is smaller than "
                             f"task.vocab_size={self.task.vocab_size}; the model must cover the task's tokens")
        if not self.model.causal:
            raise ValueError(f"model {self.model.name!r} is not causal: on next-token tasks a bidirectional "
                             "mixer sees the answer it must predict (a leak). Use a causal mixer.")
        eval_model, which = self.model, "model"
        if self.eval.model is not None:
            eval_model, which = self.eval.model, "eval.model"
            if not isinstance(eval_model, ModelConfig):
                raise ValueError(f"eval.model must be a ModelConfig or None, got {type(eval_model).__name__}")
            eval_model.validate("eval.model")
            if not eval_model.causal:
                raise ValueError(f"eval.model {eval_model.name!r} is not causal (see model)")
            if eval_model.vocab_size != self.model.vocab_size:
                raise ValueError(f"eval.model.vocab_size={eval_model.vocab_size} differs from "
                                 f"model.vocab_size={self.model.vocab_size}; the evaluation model "
                                 "reuses the trained parameters")
        if self.task.seq_len > self.model.max_len:
            raise ValueError(f"task.seq_len={self.task.seq_len} exceeds model.max_len={self.model.max_len}")
        for i, length in enumerate(self.eval_lengths):
            if not isinstance(length, int) or length <= 0:
                raise ValueError(f"eval.lengths[{i}]={length!r} must be a positive int")
            if length > eval_model.max_len:
                raise ValueError(f"eval.lengths[{i}]={length} exceeds {which}.max_len={eval_model.max_len}")
            self.task.for_eval(length).validate(f"task(at eval length {length})")
        o, s, t, e = self.optimizer, self.schedule, self.train, self.eval
        in_range("optimizer.lr", o.lr, 0.0, lo_open=True)
        in_range("optimizer.b1", o.b1, 0.0, 1.0, hi_open=True)
        in_range("optimizer.b2", o.b2, 0.0, 1.0, hi_open=True)
        in_range("optimizer.eps", o.eps, 0.0, lo_open=True)
        in_range("optimizer.weight_decay", o.weight_decay, 0.0)
        in_range("optimizer.grad_clip", o.grad_clip, 0.0)
        in_range("schedule.final_lr_fraction", s.final_lr_fraction, 0.0, 1.0)
        if not isinstance(s.warmup_steps, int) or isinstance(s.warmup_steps, bool) or s.warmup_steps < 0:
            raise ValueError(f"schedule.warmup_steps={s.warmup_steps!r} must be an int >= 0")
        for path, v in [("train.steps", t.steps), ("train.batch_size", t.batch_size),
                        ("train.log_every", t.log_every), ("train.keep_checkpoints", t.keep_checkpoints),
                        ("eval.every", e.every), ("eval.batches", e.batches), ("eval.batch_size", e.batch_size)]:
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{path}={v!r} must be a positive integer")
        if not isinstance(t.seed, int) or isinstance(t.seed, bool):
            raise ValueError(f"train.seed={t.seed!r} must be an int")
        if not isinstance(t.checkpoint_every, int) or t.checkpoint_every < 0:
            raise ValueError(f"train.checkpoint_every={t.checkpoint_every} must be >= 0 (0: final only)")
        if t.on_nonfinite not in ("stop", "skip_step"):
            raise ValueError(f"train.on_nonfinite={t.on_nonfinite!r} must be 'stop' or 'skip_step'")
        if t.segment_len is not None and (not isinstance(t.segment_len, int) or t.segment_len <= 0
                                          or self.task.seq_len % t.segment_len):
            raise ValueError(f"train.segment_len={t.segment_len} must be a positive divisor of "
                             f"task.seq_len={self.task.seq_len}")
        for axis in ("data", "fsdp", "expert", "tensor"):
            v = getattr(self.mesh, axis)
            if not isinstance(v, int) or (v <= 0 and v != -1):
                raise ValueError(f"mesh.{axis}={v!r} must be a positive int or -1 (fill)")


# ----------------------------------------------------------------------------- loading

class ExperimentFileError(ValueError):
    """User code in an experiment file failed: names the file, the line and the cause."""


def check_run_name(path: str, name: Any) -> None:
    """Run names become directory names: a plain name, no separators, not ``.``/``..``."""
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"{path}={name!r} must be a plain run name: letters, digits, '.', '_', "
                         "'-', '+', '=' and ',' only (no path separators), not '.' or '..'")


_RUN_NAME = re.compile(r"[A-Za-z0-9_.+=,\-]+")


def load_experiment_file(path: str, smoke: bool = False) -> list[ExperimentConfig]:
    """Imports an experiment file and returns its runs (``get_sweep`` or ``[get_config()]``).

    Errors in the file's own code (syntax errors, failing imports, exceptions in
    ``get_config``/``get_sweep``, a wrong return type) raise :class:`ExperimentFileError`
    naming the file, the line and the cause.
    """
    if not os.path.isfile(path):
        raise ValueError(f"experiment file {path!r} does not exist")
    module = _exec_experiment_file(path)
    fn_name = "get_sweep" if hasattr(module, "get_sweep") else "get_config"
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ValueError(f"experiment file {path!r} defines neither get_config() nor get_sweep()")
    result = _call_user(path, fn, fn_name, smoke)
    runs = list(result) if fn_name == "get_sweep" and isinstance(result, (list, tuple)) else [result]
    if fn_name == "get_sweep" and not isinstance(result, (list, tuple)):
        raise ExperimentFileError(f"{path}: get_sweep() returned a {type(result).__name__}; it must "
                                  "return a list of ExperimentConfig")
    for i, r in enumerate(runs):
        if not isinstance(r, ExperimentConfig):
            where = f"get_sweep()[{i}]" if fn_name == "get_sweep" else "get_config()"
            raise ExperimentFileError(f"{path}: {where} returned a {type(r).__name__}; it must be "
                                      "an experiments.config.ExperimentConfig")
    if not runs:
        raise ValueError(f"experiment file {path!r} returned no runs")
    names = [r.name for r in runs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"experiment file {path!r}: run names must be unique, repeated: {sorted(dup)}")
    return runs


def _exec_experiment_file(path: str) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"archlab_experiment_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ExperimentFileError(f"{e.filename or path}:{e.lineno}: syntax error: {e.msg}") from e
    except Exception as e:
        raise ExperimentFileError(f"{_user_frame(path, e)}: loading the experiment file failed: "
                                  f"{type(e).__name__}: {e}") from e
    return module


def _call_user(path: str, fn, fn_name: str, smoke: bool):
    try:
        return fn(smoke=smoke)
    except TypeError as e:
        if "smoke" in str(e) and "unexpected keyword" in str(e):
            raise ExperimentFileError(f"{path}: {fn_name}() must accept the keyword argument "
                                      f"'smoke' (def {fn_name}(smoke=False): ...)") from e
        raise ExperimentFileError(f"{_user_frame(path, e)}: {fn_name}() failed: "
                                  f"{type(e).__name__}: {e}") from e
    except Exception as e:
        raise ExperimentFileError(f"{_user_frame(path, e)}: {fn_name}() failed: "
                                  f"{type(e).__name__}: {e}") from e


def _user_frame(path: str, exc: BaseException) -> str:
    """``file:line`` of the innermost traceback frame in the experiment file (else the file)."""
    target = os.path.abspath(path)
    where = path
    for frame in traceback.extract_tb(exc.__traceback__):
        if os.path.abspath(frame.filename) == target:
            where = f"{path}:{frame.lineno}"
    return where


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], literal). Unquoted words stay strings."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected key=value, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    if not key:
        raise ValueError(f"--set {text!r}: empty key")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word such as layernorm
    return key.split("."), value


def apply_override(obj: Any, path: list[str], value: Any, full: str = "") -> Any:
    """Returns ``obj`` with the field at ``path`` replaced (dataclasses, tuples, dicts)."""
    full = full or ".".join(path)
    head, rest = path[0], path[1:]
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj)]
        if head not in names:
            raise ValueError(f"--set {full}: {type(obj).__name__} has no field {head!r}; valid fields: {names}")
        cur = getattr(obj, head)
        if rest:
            new = apply_override(cur, rest, value, full)
        else:
            if value is None and cur is not None and not _allows_none(type(obj), head):
                raise ValueError(f"--set {full}=None: this field needs a value like the current "
                                 f"{cur!r}; None is not allowed")
            new = _coerce(cur, value, full)
        return dataclasses.replace(obj, **{head: new})
    if isinstance(obj, tuple) and rest is not None:
        if not head.isdigit() or int(head) >= len(obj):
            raise ValueError(f"--set {full}: {head!r} is not an index of a {len(obj)}-tuple")
        i = int(head)
        new = apply_override(obj[i], rest, value, full) if rest else _coerce(obj[i], value, full)
        return obj[:i] + (new,) + obj[i + 1:]
    raise ValueError(f"--set {full}: cannot descend into {type(obj).__name__} at {head!r}")


def _allows_none(cls: type, field: str) -> bool:
    """Whether the dataclass field's annotation admits None (``X | None``)."""
    try:
        hint = typing.get_type_hints(cls).get(field)
    except Exception:   # unresolvable annotation: fall back to refusing None
        return False
    return hint is type(None) or type(None) in typing.get_args(hint)


def _coerce(cur: Any, value: Any, full: str) -> Any:
    if cur is None or value is None:
        return value
    if isinstance(cur, bool) != isinstance(value, bool):
        raise ValueError(f"--set {full}={value!r}: expected a bool like the current value {cur!r}")
    if isinstance(cur, float) and isinstance(value, int):
        return float(value)
    if isinstance(cur, int) and isinstance(value, float):
        raise ValueError(f"--set {full}={value!r}: expected an int like the current value {cur!r} "
                         "(a float is not converted silently)")
    if isinstance(cur, tuple) and isinstance(value, list):
        return tuple(value)
    if dataclasses.is_dataclass(cur) or type(cur) is not type(value) and not (
            isinstance(cur, (int, float)) and isinstance(value, (int, float))):
        raise ValueError(f"--set {full}={value!r}: expected a {type(cur).__name__} like the current "
                         f"value {cur!r}")
    return value


def with_overrides(cfg: ExperimentConfig, overrides: list[str]) -> ExperimentConfig:
    for text in overrides:
        path, value = parse_override(text)
        cfg = apply_override(cfg, path, value)
    return cfg


# ----------------------------------------------------------------------------- JSON

def to_jsonable(obj: Any) -> Any:
    """Dataclasses -> dicts tagged with their class name; tuples -> lists."""
    if dataclasses.is_dataclass(obj):
        out = {"__class__": type(obj).__name__}
        for f in dataclasses.fields(obj):
            out[f.name] = to_jsonable(getattr(obj, f.name))
        return out
    if isinstance(obj, (tuple, list)):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)            # strict JSON has no NaN/Infinity: "nan", "inf", "-inf"
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return repr(obj)


def config_json(cfg: ExperimentConfig) -> str:
    return json.dumps(to_jsonable(cfg), indent=2, sort_keys=True, allow_nan=False)
