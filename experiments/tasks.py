"""Synthetic sequence tasks: pure, jit-able batch generators, deterministic in (seed, step).

Every task is a frozen dataclass (a ``TaskConfig`` subclass) whose ``sample(key, B)``
returns a ``Batch`` of ``[B, T]`` arrays. Conventions shared by all tasks:

* Next-token convention: ``targets[:, t]`` is what the model must emit at position
  ``t`` after reading ``inputs[:, :t + 1]``. Scored positions (``loss_mask == 1``)
  hold the answers; the others hold the next input token (0 at the last position),
  so a full LM loss is defined but carries no task signal: use the mask.
* Token 0 is pad / blank / filler; task-specific special tokens sit at the top of
  the vocabulary (``V - 1``, ``V - 2``), content tokens in between (per-task maps
  in the class docstrings; ``min_vocab()`` accounts for them).
* Randomness: one ``uniform(key, [B, U])`` draw per batch (a single threefry call
  keeps CPU compiles fast); each example's row is cut into the named pieces of
  ``_draws`` for a vmapped ``_example``. Integers are ``floor(u * n)`` (2^23 levels,
  fine for vocabularies far below that), draws without replacement Gumbel top-k.
* ``for_eval(T)`` is the same task at length ``T``: fractions (passkey ``depth``)
  and T-derived sizes (selective-copy ``L``, ``copy_len=None``) scale, counts
  (``num_kv_pairs``, ``num_tokens``, a fixed ``copy_len``) do not.
"""

import dataclasses
import itertools
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array


class Batch(NamedTuple):
    """One batch. inputs/targets: [B, T] int32; loss_mask: [B, T] float32 (1 = scored)."""

    inputs: Array
    targets: Array
    loss_mask: Array


def _err(path: str, field: str, value, allowed: str) -> ValueError:
    return ValueError(f"{path}.{field}={value!r} {allowed}")


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _distinct(u: Array, logits: Array, k: int) -> Array:
    """k distinct indices into ``logits`` [N], drawn one after another with p ∝ exp(logits).

    Gumbel top-k over uniforms ``u`` [N] in (0, 1): the order of the result is the
    draw order, the same distribution as numpy's ``choice(N, k, replace=False,
    p=softmax(logits))``.
    """
    return jax.lax.top_k(logits - jnp.log(-jnp.log(u)), k)[1]


def _ints(u: Array, low: int, high: int) -> Array:
    """Uniform integers in ``[low, high)`` from uniforms ``u`` in (0, 1), same shape."""
    return low + jnp.minimum((u * (high - low)).astype(jnp.int32), high - low - 1)


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Base class: sequence length, vocabulary, validation and batching.

    Subclasses add knobs as fields (``int`` fields must be positive, ``float``
    fields finite, ``bool`` fields booleans; the rest is checked in ``_check``) and
    implement ``min_vocab``, ``_draws`` and ``_example``.
    """

    name: ClassVar[str] = "task"
    vocab_knobs: ClassVar[tuple[str, ...]] = ()  # fields that min_vocab depends on

    seq_len: int = 64
    vocab_size: int = 256

    def min_vocab(self) -> int:
        """Smallest ``vocab_size`` this configuration can use."""
        raise NotImplementedError

    def _check(self, path: str) -> None:
        """Task-specific validation (after the generic type/positivity checks)."""

    def _draws(self) -> dict[str, int]:  # name -> uniforms per example, the pieces _example gets
        raise NotImplementedError

    def _example(self, u: dict[str, Array]) -> tuple[Array, Array, Array]:  # inputs, answers, scored: [T]
        raise NotImplementedError

    def validate(self, path: str = "task") -> None:
        """Raise ``ValueError`` naming ``{path}.{field}``, its value and what is allowed."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.type is bool and not isinstance(v, bool):
                raise _err(path, f.name, v, "must be a bool")
            if f.type is int and not _is_count(v):
                raise _err(path, f.name, v, "must be a positive int")
            if f.type is float and not _is_real(v):
                raise _err(path, f.name, v, "must be a finite float")
        self._check(path)
        need = self.min_vocab()
        if self.vocab_size < need:
            knobs = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.vocab_knobs)
            where = f"{self.name} with {knobs}" if knobs else self.name
            raise _err(path, "vocab_size", self.vocab_size, f"is too small for {where}: need >= {need}")

    def _need_len(self, path: str, need: int, knobs: str) -> None:
        if self.seq_len < need:
            msg = f"is too short for {self.name} with {knobs}: need >= {need}"
            raise _err(path, "seq_len", self.seq_len, msg)

    def sample(self, key: Array, batch_size: int) -> Batch:
        """Draw a batch; pure and jit-able with ``batch_size`` static.

        Args:
          key: a PRNG key (raw ``PRNGKey`` or typed ``jax.random.key``).
          batch_size: B, a Python int.

        Returns:
          ``Batch`` with inputs/targets [B, T] int32 and loss_mask [B, T] float32.
        """
        self.validate()
        if not _is_count(batch_size):
            raise ValueError(f"batch_size={batch_size!r} must be a positive int (static under jit)")
        sizes = self._draws()
        u = jax.random.uniform(key, (batch_size, sum(sizes.values())), minval=jnp.finfo(jnp.float32).tiny)
        parts = dict(zip(sizes, jnp.split(u, list(itertools.accumulate(sizes.values()))[:-1], axis=1)))
        inputs, answers, scored = jax.vmap(self._example)(parts)
        inputs = inputs.astype(jnp.int32)  # [B, T]
        next_tok = jnp.pad(inputs[:, 1:], ((0, 0), (0, 1)))  # [B, T]
        targets = jnp.where(scored, answers.astype(jnp.int32), next_tok)
        return Batch(inputs, targets, scored.astype(jnp.float32))

    def for_eval(self, seq_len: int) -> "TaskConfig":
        """The same task at length ``seq_len`` (not validated: call ``validate``)."""
        return dataclasses.replace(self, seq_len=seq_len)


@dataclasses.dataclass(frozen=True)
class MQAR(TaskConfig):
    """Multi-query associative recall (Zoology, Arora et al. 2023, arXiv:2312.04927).

    Layout (kv = ``num_kv_pairs``, V = vocab, h = V // 2)::

        inputs   k1 v1 k2 v2 .. k_kv v_kv | 0 0 k2 0 0 0 k1 0 ...
        targets  (next tokens)            | . . v2 . . . v1 . ...   (scored: the v's)

    Keys are distinct draws from ``1..h-1``, values distinct draws from ``h..V-1``.
    After the ``2 kv`` prefix the rest of the sequence is ``(T - 2 kv) // 2`` even
    slots; kv distinct slots are drawn without replacement with p(g) ∝ (g+1)^(a-1)
    (g = slot index from the end of the prefix, a = ``power_a``: 0.01 favours short
    gaps, 1.0 is uniform), and each key is queried once, at the start of its slot
    (position ``2 kv + 2 g``). As in Zoology's generator, the answer is *not*
    written after the query: it is the target at the query position (the model
    has just read the key) and the next input is filler, so the model never reads
    an answer it is scored on.
    Exactly kv positions are scored. Filler is 0, or uniform ``1..V-1`` with
    ``random_non_queries`` (it may then coincide with a key; it is never scored).
    Odd T leaves the final position as filler. Special tokens: 0 only.
    """

    name: ClassVar[str] = "mqar"
    vocab_knobs: ClassVar[tuple[str, ...]] = ("num_kv_pairs",)

    num_kv_pairs: int = 8
    power_a: float = 0.01
    random_non_queries: bool = False

    def min_vocab(self) -> int:
        return 2 * self.num_kv_pairs + 2  # kv keys in 1..h-1 need h - 1 >= kv

    def _check(self, path: str) -> None:
        if self.power_a <= 0:
            raise _err(path, "power_a", self.power_a, "must be > 0 (1.0 = uniform gaps)")
        self._need_len(path, 4 * self.num_kv_pairs, f"num_kv_pairs={self.num_kv_pairs}")

    def _draws(self):
        t, v, kv = self.seq_len, self.vocab_size, self.num_kv_pairs
        fill = t if self.random_non_queries else 0
        return {"keys": v // 2 - 1, "values": v - v // 2, "slots": (t - 2 * kv) // 2, "fill": fill}

    def _example(self, u):
        kv, t, v = self.num_kv_pairs, self.seq_len, self.vocab_size
        h = v // 2
        keys = 1 + _distinct(u["keys"], jnp.zeros(h - 1), kv)  # [kv]
        values = h + _distinct(u["values"], jnp.zeros(v - h), kv)  # [kv]
        gaps = jnp.arange((t - 2 * kv) // 2, dtype=jnp.float32)
        slots = _distinct(u["slots"], (self.power_a - 1.0) * jnp.log1p(gaps), kv)  # [kv]
        qpos = 2 * kv + 2 * slots
        if self.random_non_queries:
            inputs = _ints(u["fill"], 1, v)
        else:
            inputs = jnp.zeros((t,), jnp.int32)
        inputs = inputs.at[: 2 * kv].set(jnp.stack([keys, values], -1).reshape(-1))
        inputs = inputs.at[qpos].set(keys)
        answers = jnp.zeros((t,), jnp.int32).at[qpos].set(values)
        scored = jnp.zeros((t,), bool).at[qpos].set(True)
        return inputs, answers, scored


@dataclasses.dataclass(frozen=True)
class SelectiveCopy(TaskConfig):
    """Selective copying (Mamba, Gu & Dao 2023, §4.1.1; S4's "variable copying").

    Layout (M = ``num_tokens``, A = ``alphabet_size``, L = T - M)::

        inputs   0 d1 0 0 d2 0 .. d_M 0 | A-1 A-1 .. A-1
        targets  (next tokens)          | d1  d2  .. d_M    (scored: the last M)

    The first L positions are blanks (0) with M data tokens, iid uniform in
    ``1..A-2``, at M distinct sorted uniform positions; the last M positions are
    markers ``A-1``, and at the j-th marker the model must emit d_j. The markers
    are not replaced by the answers (no teacher forcing). L = T - M, so
    ``for_eval`` lengthens the blank region. Mamba's setting: A = 16, M = 16.
    Special tokens: 0 blank, A-1 marker; tokens >= A are unused.
    """

    name: ClassVar[str] = "selective_copy"
    vocab_knobs: ClassVar[tuple[str, ...]] = ("alphabet_size",)

    num_tokens: int = 16
    alphabet_size: int = 16

    def min_vocab(self) -> int:
        return self.alphabet_size

    def _check(self, path: str) -> None:
        if self.alphabet_size < 4:
            msg = "must be >= 4 (blank, marker, >= 2 data tokens)"
            raise _err(path, "alphabet_size", self.alphabet_size, msg)
        self._need_len(path, 2 * self.num_tokens, f"num_tokens={self.num_tokens}")

    def _draws(self):
        return {"pos": self.seq_len - self.num_tokens, "data": self.num_tokens}

    def _example(self, u):
        m, t, a = self.num_tokens, self.seq_len, self.alphabet_size
        blanks = t - m
        pos = jnp.sort(_distinct(u["pos"], jnp.zeros(blanks), m))  # [M]
        data = _ints(u["data"], 1, a - 1)  # [M]
        region = jnp.zeros((blanks,), jnp.int32).at[pos].set(data)
        inputs = jnp.concatenate([region, jnp.full((m,), a - 1, jnp.int32)])
        answers = jnp.concatenate([jnp.zeros((blanks,), jnp.int32), data])
        return inputs, answers, jnp.arange(t) >= blanks


@dataclasses.dataclass(frozen=True)
class InductionHeads(TaskConfig):
    """Induction heads (Olsson et al. 2022; H3, Fu et al. 2023; Mamba §4.1.2).

    Layout (V = vocab, trigger s = V - 1)::

        inputs   x x x .. s v x x .. x s
        targets  (next tokens)         v    (scored: the final position only)

    Tokens are iid uniform in ``1..V-2``; the trigger s is written once at a
    uniform position p in ``0..T-3`` and again at the final position; the value
    v is the token at p + 1 and is the target at the final position. Only the
    final position is scored, in training and evaluation alike (the other
    targets are unpredictable random tokens), so ``for_eval`` only changes T and
    models are trained at one length and evaluated at longer ones (Mamba: V = 16,
    train at T = 256, evaluate up to 2^20). Special tokens: 0 unused (pad), V-1
    trigger.
    """

    name: ClassVar[str] = "induction_heads"

    def min_vocab(self) -> int:
        return 4  # pad, trigger and >= 2 content tokens

    def _check(self, path: str) -> None:
        self._need_len(path, 3, "a trigger, its value and the final trigger")

    def _draws(self):
        return {"tokens": self.seq_len, "pos": 1}

    def _example(self, u):
        t, trig = self.seq_len, self.vocab_size - 1
        x = _ints(u["tokens"], 1, trig)
        p = _ints(u["pos"][0], 0, t - 2)
        x = x.at[p].set(trig).at[t - 1].set(trig)
        answers = jnp.zeros((t,), jnp.int32).at[t - 1].set(x[p + 1])
        return x, answers, jnp.arange(t) == t - 1


@dataclasses.dataclass(frozen=True)
class Passkey(TaskConfig):
    """Passkey / needle retrieval (Mohtashami & Jaggi 2023; multi-key as in RULER, Hsieh et al. 2024).

    Layout (n = ``num_needles``, D = ``num_digits``, needle marker N = V - 1,
    query marker Q = V - 2)::

        n = 1:  inputs   f f N d1..dD f f f f .. Q  d1 .. d_{D-1}
                targets  (next tokens)           d1 d2 .. dD       (scored: last D)
        n > 1:  needles are ``N k d1..dD``, the query is ``Q k d1..d_{D-1}``

    The haystack (all but the last D + keyed positions) is cut into S needle-sized
    slots (the remainder is filler); needles sit on this grid, so alignment cannot
    single out the queried one. It takes slot ``round(depth * (S - 1))`` (0 = start,
    1 = end of the haystack) or a uniform one (``depth=None``); distractors take
    uniform other slots and carry distinct keys, which the query names. The answer
    digits are teacher-forced after the query (d_j is emitted after reading
    d1..d_{j-1}), as in LM passkey evaluation. Filler is 0, or uniform ``1..V-3``
    with ``random_filler``. Tokens: 0 filler, 1..10 the digits 0-9, 11..V-3 keys,
    V-2 Q, V-1 N.
    """

    name: ClassVar[str] = "passkey"
    vocab_knobs: ClassVar[tuple[str, ...]] = ("num_needles",)

    num_digits: int = 5
    num_needles: int = 1
    depth: float | None = None
    random_filler: bool = False

    def min_vocab(self) -> int:
        return 13 + (self.num_needles if self.num_needles > 1 else 0)

    def _check(self, path: str) -> None:
        d = self.depth
        if d is not None and not (_is_real(d) and 0 <= d <= 1):
            raise _err(path, "depth", d, "must be None (uniform) or a float in [0, 1]")
        keyed, b, _ = self._layout()
        need = self.num_needles * b + keyed + self.num_digits
        self._need_len(path, need, f"num_digits={self.num_digits}, num_needles={self.num_needles}")

    def _layout(self) -> tuple[int, int, int]:
        """(keyed, needle block length b, haystack length)."""
        keyed = int(self.num_needles > 1)
        return keyed, 1 + keyed + self.num_digits, self.seq_len - keyed - self.num_digits

    def _draws(self):
        keyed, b, hay = self._layout()
        n, nd, t, v = self.num_needles, self.num_digits, self.seq_len, self.vocab_size
        return {"digits": n * nd, "keys": (v - 13) * keyed, "slots": hay // b, "fill": t * self.random_filler}

    def _example(self, u):
        t, v, n, nd = self.seq_len, self.vocab_size, self.num_needles, self.num_digits
        keyed, b, hay = self._layout()
        slots_n = hay // b
        digits = _ints(u["digits"], 1, 11).reshape(n, nd)  # [n, D]; needle 0 is queried
        logits = jnp.zeros(slots_n)
        if self.depth is not None:
            logits = logits.at[round(self.depth * (slots_n - 1))].set(jnp.inf)
        slots = _distinct(u["slots"], logits, n)  # [n]; slots[0] is the queried needle's
        cols = [jnp.full((n, 1), v - 1, jnp.int32)]
        qblock = [jnp.full((1,), v - 2, jnp.int32)]
        if keyed:
            keys = 11 + _distinct(u["keys"], jnp.zeros(v - 13), n)  # [n]
            cols.append(keys[:, None])
            qblock.append(keys[:1])
        blocks = jnp.concatenate(cols + [digits], axis=1)  # [n, b]
        qblock = jnp.concatenate(qblock + [digits[0, :-1]])  # [t - hay]
        if self.random_filler:
            inputs = _ints(u["fill"], 1, v - 2)
        else:
            inputs = jnp.zeros((t,), jnp.int32)
        where = (slots[:, None] * b + jnp.arange(b)).reshape(-1)  # [n * b]
        inputs = inputs.at[where].set(blocks.reshape(-1)).at[hay:].set(qblock)
        answers = jnp.zeros((t,), jnp.int32).at[t - nd :].set(digits[0])
        return inputs, answers, jnp.arange(t) >= t - nd


@dataclasses.dataclass(frozen=True)
class Copy(TaskConfig):
    """Copying (the LM copy task of Jelassi et al. 2024, "Repeat After Me").

    Layout (n = ``copy_len``, separator s = V - 1)::

        inputs   x1 x2 .. xn s  x1 .. x_{n-1} 0 .. 0
        targets  (next tokens)  x1 x2 .. xn    ...     (scored: positions n..2n-1)

    x is iid uniform in ``1..V-2``. The copy is teacher-forced: at position
    n + j the model has read x1..xj of its copy and emits x_{j+1}. Positions
    after the copy are pad (0, unscored). ``copy_len=None`` means ``T // 2`` and
    scales with ``for_eval``; a fixed ``copy_len`` stays fixed (longer T only
    adds padding). Special tokens: 0 pad, V-1 separator.
    """

    name: ClassVar[str] = "copy"

    copy_len: int | None = None

    @property
    def length(self) -> int:
        """n, the number of tokens to copy."""
        return self.seq_len // 2 if self.copy_len is None else self.copy_len

    def min_vocab(self) -> int:
        return 4  # pad, separator and >= 2 content tokens

    def _check(self, path: str) -> None:
        c = self.copy_len
        if c is not None and not _is_count(c):
            raise _err(path, "copy_len", c, "must be None (seq_len // 2) or a positive int")
        self._need_len(path, 2 * max(self.length, 1), f"copy_len={c!r}")

    def _draws(self):
        return {"tokens": self.length}

    def _example(self, u):
        t, n = self.seq_len, self.length
        x = _ints(u["tokens"], 1, self.vocab_size - 1)
        pad = jnp.zeros((t - 2 * n,), jnp.int32)
        sep = jnp.full((1,), self.vocab_size - 1, jnp.int32)
        inputs = jnp.concatenate([x, sep, x[:-1], pad])
        answers = jnp.concatenate([jnp.zeros((n,), jnp.int32), x, pad])
        pos = jnp.arange(t)
        return inputs, answers, (pos >= n) & (pos < 2 * n)


TASKS: dict[str, type[TaskConfig]] = {c.name: c for c in (MQAR, SelectiveCopy, InductionHeads, Passkey, Copy)}


def make_task(name: str, **kwargs) -> TaskConfig:
    """Build and validate the task ``name`` with field overrides ``kwargs``.

    Raises:
      ValueError: unknown task (lists the valid names), unknown field (lists the
        valid fields) or an invalid value.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(sorted(TASKS))}")
    cls = TASKS[name]
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(unknown)} for task {name!r}; valid fields: {', '.join(valid)}"
        )
    task = cls(**kwargs)
    task.validate()
    return task


STREAMS: dict[str, int] = {"train": 0, "eval": 1}


def batch_key(seed: int, step: int, stream: str = "train") -> Array:
    """``fold_in(fold_in(PRNGKey(seed), STREAMS[stream]), step)``; seed/step may be traced."""
    if stream not in STREAMS:
        raise ValueError(f"stream={stream!r} is not a data stream; valid streams: {', '.join(STREAMS)}")
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), STREAMS[stream]), step)


def get_batch(task: TaskConfig, seed: int, step: int, batch_size: int, stream: str = "train") -> Batch:
    """The batch of ``step`` in ``stream``: ``task.sample(batch_key(seed, step, stream), batch_size)``.

    Jit it with ``task``, ``batch_size`` and ``stream`` static (tasks are frozen,
    hashable dataclasses); ``seed`` and ``step`` may be traced.
    """
    return task.sample(batch_key(seed, step, stream), batch_size)
