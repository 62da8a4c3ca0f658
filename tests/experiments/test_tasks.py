"""Synthetic task generators: values checked by independent numpy oracles.

Each oracle recovers the scored answer from the *inputs* alone (the way a perfect
model would) and compares it with the targets at every scored position.
"""

import functools

import jax
import numpy as np
import pytest

from experiments import tasks as T

B = 64  # examples per oracle check


def np_batch(batch):
    return tuple(np.asarray(x) for x in batch)


@functools.lru_cache(maxsize=None)
def sampler(task, batch_size):
    """One compile per (task, batch size), shared by all tests (CPU compiles dominate)."""
    return jax.jit(task.sample, static_argnums=1)


def draw(task, seed=0, step=0, stream="train", batch_size=B):
    return np_batch(sampler(task, batch_size)(T.batch_key(seed, step, stream), batch_size))


# ----------------------------------------------------------------------------- oracles


def oracle_mqar(task, inp, tgt, mask):
    kv, v = task.num_kv_pairs, task.vocab_size
    h = v // 2
    for x, y, m in zip(inp, tgt, mask):
        keys, vals = x[0 : 2 * kv : 2], x[1 : 2 * kv : 2]
        assert len(set(keys)) == kv and keys.min() >= 1 and keys.max() < h
        assert len(set(vals)) == kv and vals.min() >= h and vals.max() < v
        table = dict(zip(keys.tolist(), vals.tolist()))
        scored = np.flatnonzero(m)
        assert len(scored) == kv  # exactly one scored position per kv pair
        assert np.all(scored >= 2 * kv) and np.all((scored - 2 * kv) % 2 == 0)
        assert sorted(x[scored].tolist()) == sorted(keys.tolist())  # each key queried once
        assert [table[k] for k in x[scored].tolist()] == y[scored].tolist()
        if not task.random_non_queries:
            rest = np.setdiff1d(np.arange(2 * kv, len(x)), scored)
            assert np.all(x[rest] == 0)
        else:
            assert np.all(x != 0)


def oracle_selective_copy(task, inp, tgt, mask):
    m, a = task.num_tokens, task.alphabet_size
    blanks = task.seq_len - m
    for x, y, s in zip(inp, tgt, mask):
        region = x[:blanks]
        data = region[region != 0]
        assert len(data) == m and data.min() >= 1 and data.max() <= a - 2
        assert np.all(x[blanks:] == a - 1)
        np.testing.assert_array_equal(y[blanks:], data)
        np.testing.assert_array_equal(s, np.arange(task.seq_len) >= blanks)


def oracle_induction_heads(task, inp, tgt, mask):
    t, trig = task.seq_len, task.vocab_size - 1
    for x, y, s in zip(inp, tgt, mask):
        pos = np.flatnonzero(x == trig)
        assert len(pos) == 2 and pos[1] == t - 1 and pos[0] <= t - 3
        assert y[t - 1] == x[pos[0] + 1]
        assert np.flatnonzero(s).tolist() == [t - 1]
        assert x.min() >= 1


def oracle_passkey(task, inp, tgt, mask):
    t, v, nd, n = task.seq_len, task.vocab_size, task.num_digits, task.num_needles
    keyed = int(n > 1)
    for x, y, s in zip(inp, tgt, mask):
        q = np.flatnonzero(x == v - 2)
        assert q.tolist() == [t - nd - keyed]
        needles = np.flatnonzero(x == v - 1)
        assert len(needles) == n
        if keyed:
            assert len(set(x[needles + 1].tolist())) == n  # distinct keys
            needles = needles[x[needles + 1] == x[q[0] + 1]]
        assert len(needles) == 1
        start = needles[0] + 1 + keyed
        digits = x[start : start + nd]
        assert digits.min() >= 1 and digits.max() <= 10
        assert np.flatnonzero(s).tolist() == list(range(t - nd, t))
        np.testing.assert_array_equal(y[s > 0], digits)


def oracle_copy(task, inp, tgt, mask):
    n, t = task.length, task.seq_len
    for x, y, s in zip(inp, tgt, mask):
        assert x[n] == task.vocab_size - 1 and np.all(x[:n] >= 1) and np.all(x[:n] <= task.vocab_size - 2)
        assert np.flatnonzero(s).tolist() == list(range(n, 2 * n))
        np.testing.assert_array_equal(y[n : 2 * n], x[:n])
        assert np.all(x[2 * n :] == 0)


ORACLES = {
    "mqar": oracle_mqar,
    "selective_copy": oracle_selective_copy,
    "induction_heads": oracle_induction_heads,
    "passkey": oracle_passkey,
    "copy": oracle_copy,
}

CASES = {
    "mqar": T.MQAR(seq_len=64, vocab_size=64, num_kv_pairs=8),
    "mqar-random-odd": T.MQAR(seq_len=37, vocab_size=20, num_kv_pairs=4, random_non_queries=True),
    "selective_copy": T.SelectiveCopy(seq_len=40, num_tokens=8, alphabet_size=10),
    "induction_heads": T.InductionHeads(seq_len=33, vocab_size=8),
    "passkey": T.Passkey(seq_len=48, vocab_size=16, num_digits=5),
    "passkey-multi-random": T.Passkey(seq_len=63, vocab_size=20, num_digits=3, num_needles=4, random_filler=True),
    "copy": T.Copy(seq_len=31, vocab_size=12),
    "copy-fixed": T.Copy(seq_len=24, vocab_size=5, copy_len=7),
}
ids = list(CASES)


def test_registry():
    assert set(T.TASKS) == {"mqar", "selective_copy", "induction_heads", "passkey", "copy"}
    for name, cls in T.TASKS.items():
        assert cls.name == name and cls.__doc__
        cls().validate()  # defaults are valid


@pytest.mark.parametrize("case", ids)
def test_oracle_recovers_answers(case):
    task = CASES[case]
    inp, tgt, mask = draw(task)
    assert inp.shape == tgt.shape == mask.shape == (B, task.seq_len)
    assert inp.dtype == tgt.dtype == np.int32 and mask.dtype == np.float32
    assert inp.min() >= 0 and inp.max() < task.vocab_size and tgt.max() < task.vocab_size
    ORACLES[task.name](task, inp, tgt, mask)
    next_tok = np.pad(inp[:, 1:], ((0, 0), (0, 1)))
    np.testing.assert_array_equal(tgt[mask == 0], next_tok[mask == 0])  # unscored: next token


@pytest.mark.parametrize("case", ids)
def test_deterministic_and_streams_differ(case):
    task = CASES[case]
    base = draw(task, seed=0, step=3)
    for a, b in zip(base, draw(task, seed=0, step=3)):
        np.testing.assert_array_equal(a, b)
    others = [dict(seed=0, step=4), dict(seed=0, step=3, stream="eval"), dict(seed=1, step=3)]
    for kw in others:  # another step, the eval stream, another seed
        assert not np.array_equal(base[0], draw(task, **kw)[0]), kw


def test_get_batch_jit_eager_and_typed_key_agree():
    task = T.Copy(seq_len=12, vocab_size=6)
    # The train loop's pattern: task/batch_size/stream static, seed and step traced.
    fn = jax.jit(T.get_batch, static_argnames=("task", "batch_size", "stream"))
    a = np_batch(fn(task, 2, 5, batch_size=4, stream="eval"))
    b = np_batch(T.get_batch(task, 2, 5, 4, "eval"))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    oracle_copy(task, *a)
    c = np_batch(jax.jit(task.sample, static_argnums=1)(jax.random.key(7), 4))  # new-style key
    oracle_copy(task, *c)


def test_batch_key_is_fold_in_of_stream_then_step():
    want = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(5), 1), 9)
    np.testing.assert_array_equal(np.asarray(T.batch_key(5, 9, "eval")), np.asarray(want))
    traced = jax.jit(T.batch_key, static_argnames="stream")(5, 9, stream="eval")
    np.testing.assert_array_equal(np.asarray(traced), np.asarray(want))


def slot_fraction_in_first_quarter(power_a):
    task = T.MQAR(seq_len=256, vocab_size=64, num_kv_pairs=8, power_a=power_a)
    _, _, mask = draw(task, batch_size=256)
    slots = (np.nonzero(mask)[1] - 2 * task.num_kv_pairs) // 2
    space = (task.seq_len - 2 * task.num_kv_pairs) // 2  # 120 slots
    return np.mean(slots < space // 4)


def test_mqar_gaps_follow_power_law():
    # Uniform would put 1/4 of the queries in the first quarter of the slots;
    # p ∝ (g+1)^(a-1) with a = 0.01 puts ~3/4 there (less, without replacement).
    assert slot_fraction_in_first_quarter(0.01) > 0.5
    assert 0.2 < slot_fraction_in_first_quarter(1.0) < 0.3


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey_depth_places_queried_needle(depth):
    task = T.Passkey(seq_len=60, vocab_size=20, num_digits=4, num_needles=3, depth=depth)
    inp, tgt, mask = draw(task)
    oracle_passkey(task, inp, tgt, mask)
    b, hay = 2 + task.num_digits, task.seq_len - task.num_digits - 1
    want = round(depth * (hay // b - 1)) * b
    for x in inp:
        key = x[task.seq_len - task.num_digits]  # the key named by the query
        assert x[want] == task.vocab_size - 1 and x[want + 1] == key


def test_for_eval_scales_length():
    ind = T.InductionHeads(seq_len=16, vocab_size=8)
    long = ind.for_eval(200)
    assert type(long) is T.InductionHeads and long.seq_len == 200 and long.vocab_size == 8
    oracle_induction_heads(long, *draw(long))  # still one scored position, the last
    sc = T.SelectiveCopy(seq_len=32, num_tokens=4, alphabet_size=6).for_eval(96)
    oracle_selective_copy(sc, *draw(sc))  # the blank region grows to 92
    assert T.Copy(seq_len=20).for_eval(50).length == 25
    assert T.Copy(seq_len=20, copy_len=6).for_eval(50).length == 6
    assert T.Passkey(depth=0.25).for_eval(512).depth == 0.25


@pytest.mark.parametrize(
    "name,kwargs,match",
    [
        ("mqar", dict(vocab_size=10), r"task\.vocab_size=10 is too small for mqar with num_kv_pairs=8: need >= 18"),
        ("mqar", dict(seq_len=30), r"task\.seq_len=30 is too short for mqar with num_kv_pairs=8: need >= 32"),
        ("mqar", dict(num_kv_pairs=0), r"task\.num_kv_pairs=0 must be a positive int"),
        ("mqar", dict(power_a=-1.0), r"task\.power_a=-1\.0 must be > 0"),
        ("mqar", dict(power_a=float("nan")), r"task\.power_a=nan must be a finite float"),
        ("mqar", dict(random_non_queries=1), r"task\.random_non_queries=1 must be a bool"),
        ("copy", dict(seq_len=-4), r"task\.seq_len=-4 must be a positive int"),
        ("copy", dict(copy_len=40), r"task\.seq_len=64 is too short for copy with copy_len=40: need >= 80"),
        ("copy", dict(copy_len=0), r"task\.copy_len=0 must be None"),
        ("selective_copy", dict(seq_len=20), r"task\.seq_len=20 is too short .* need >= 32"),
        ("selective_copy", dict(vocab_size=8), r"task\.vocab_size=8 .* selective_copy with alphabet_size=16"),
        ("selective_copy", dict(alphabet_size=3), r"task\.alphabet_size=3 must be >= 4"),
        ("induction_heads", dict(vocab_size=3), r"task\.vocab_size=3 is too small for induction_heads: need >= 4"),
        ("passkey", dict(depth=1.5), r"task\.depth=1\.5 must be None \(uniform\) or a float in \[0, 1\]"),
        ("passkey", dict(num_needles=4, vocab_size=16), r"task\.vocab_size=16 .* num_needles=4: need >= 17"),
        ("passkey", dict(seq_len=20, num_needles=3), r"task\.seq_len=20 is too short for passkey .* need >= 27"),
    ],
)
def test_validation_names_field_and_value(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        T.make_task(name, **kwargs)


def test_bad_names_list_valid_ones():
    with pytest.raises(ValueError, match=r"unknown task 'mqr'; valid tasks: copy, induction_heads, mqar, passkey"):
        T.make_task("mqr")
    with pytest.raises(ValueError, match=r"unknown field\(s\) kv_pairs .* valid fields: seq_len, vocab_size, num_kv"):
        T.make_task("mqar", kv_pairs=4)
    with pytest.raises(ValueError, match=r"stream='test' .* valid streams: train, eval"):
        T.batch_key(0, 0, "test")
    with pytest.raises(ValueError, match=r"batch_size=0 must be a positive int"):
        T.MQAR().sample(jax.random.PRNGKey(0), 0)
    with pytest.raises(ValueError, match=r"my\.task\.seq_len=8"):
        T.MQAR(seq_len=8).validate("my.task")
    assert T.make_task("passkey", num_needles=2).min_vocab() == 15
