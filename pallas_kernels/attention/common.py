"""Pieces shared by the three flash-attention kernels (Triton, Mosaic TPU, Mosaic GPU).

* ``visible``: the element mask of ``reference.visible`` (causal, window, segment
  ids) plus the true key length, on whatever position tiles a kernel builds
  (either orientation, any layout); None when everything is visible.
* ``kv_block_range`` / ``q_block_range``: the key (query) blocks a tile of query
  (key) rows can see under the causal/window band, as traced int32 bounds for the
  kernels that loop over blocks in-kernel (Triton, Mosaic GPU; the TPU kernel
  tabulates the same bands statically, ``pallas_tpu_common``).
* ``split_seg_refs``: splits a kernel's refs around the optional segment-id refs.
* ``run_padded``: zero-pads q/k/v and the segment ids to a kernel's tiles and
  slices the output back (the kernels in the ``[B, T, H, Dh]`` layout).
* ``flash_vjp``: the ``jax.custom_vjp`` that ties a kernel's forward (output and
  log-sum-exp) to its backward (dQ, dK, dV).

Verified only through the kernels that use them (see each kernel module).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.tiling import pad_to


def idiv(x, d: int):
    """Floor division of a non-negative traced int32 by a static int."""
    return lax.div(x, jnp.int32(d))


def visible(qpos, kpos, cfg, s_padded: int, qseg=None, kseg=None):
    """Visibility from broadcastable query/key positions, or None if all visible.

    ``cfg`` supplies ``s`` (true key length), ``causal`` and ``window``; keys at
    ``>= cfg.s`` are masked when the keys were padded to ``s_padded``.
    """
    ok = None

    def add(ok, c):
        return c if ok is None else ok & c

    if s_padded > cfg.s:
        ok = add(ok, kpos < cfg.s)
    if cfg.causal:
        ok = add(ok, kpos <= qpos)
    if cfg.window is not None:
        ok = add(ok, qpos - kpos < cfg.window)
        if not cfg.causal:
            ok = add(ok, kpos - qpos < cfg.window)
    if qseg is not None:
        ok = add(ok, qseg == kseg)
    return ok


def kv_block_range(q0, rows: int, bk: int, n_k: int, cfg):
    """Key blocks ``[lo, hi)`` (of ``n_k`` blocks of ``bk``) that query rows
    ``[q0, q0 + rows)`` can see; an empty range has ``lo == hi``."""
    q1 = q0 + (rows - 1)
    lo, hi = jnp.int32(0), jnp.int32(n_k)
    if cfg.window is not None:
        lo = idiv(jnp.maximum(q0 - (cfg.window - 1), 0), bk)
    if cfg.causal:
        hi = jnp.minimum(hi, idiv(q1, bk) + 1)
    elif cfg.window is not None:
        hi = jnp.minimum(hi, idiv(q1 + (cfg.window - 1), bk) + 1)
    lo = jnp.minimum(lo, n_k)
    return lo, jnp.maximum(hi, lo)


def q_block_range(k0, rows: int, bq: int, n_q: int, cfg):
    """Query blocks ``[lo, hi)`` (of ``n_q`` blocks of ``bq``) that can see keys
    ``[k0, k0 + rows)``; an empty range has ``lo == hi``."""
    k1 = k0 + (rows - 1)
    lo, hi = jnp.int32(0), jnp.int32(n_q)
    if cfg.causal:
        lo = idiv(k0, bq)
    elif cfg.window is not None:
        lo = idiv(jnp.maximum(k0 - (cfg.window - 1), 0), bq)
    if cfg.window is not None:
        hi = jnp.minimum(hi, idiv(k1 + (cfg.window - 1), bq) + 1)
    lo = jnp.minimum(lo, n_q)
    return lo, jnp.maximum(hi, lo)


def split_seg_refs(refs, n_in: int, has_seg: bool):
    """(inputs, (q_seg_ref, kv_seg_ref) or (None, None), the remaining refs)."""
    ins = refs[:n_in]
    if has_seg:
        return ins, refs[n_in:n_in + 2], refs[n_in + 2:]
    return ins, (None, None), refs[n_in:]


def run_padded(flash: Callable, q, k, v, q_seg, kv_seg, cfg, *, tp: int, sp: int, dp: int):
    """``flash(q, k, v, q_seg, kv_seg, cfg)`` on inputs zero-padded to time ``tp`` / ``sp``
    and head dim ``dp`` (segment ids as int32), sliced back to q's ``[B, T, H, Dh]``.

    For the kernels that keep the ``[B, T, H, Dh]`` layout (Triton, Mosaic GPU).
    """
    (b, t, h, d), kh = q.shape, k.shape[2]
    qp = pad_to(q, (b, tp, h, dp))
    kp, vp = pad_to(k, (b, sp, kh, dp)), pad_to(v, (b, sp, kh, dp))
    if q_seg is not None:
        q_seg = pad_to(q_seg.astype(jnp.int32), (b, tp))
        kv_seg = pad_to(kv_seg.astype(jnp.int32), (b, sp))
    out = flash(qp, kp, vp, q_seg, kv_seg, cfg)
    return out[:, :t, :, :d]


def flash_vjp(forward: Callable, backward: Callable):
    """``f(q, k, v, q_seg, kv_seg, cfg) -> o`` with a ``jax.custom_vjp``.

    ``forward(q, k, v, q_seg, kv_seg, cfg) -> (o, lse)`` and
    ``backward(q, k, v, q_seg, kv_seg, o, lse, do, cfg) -> (dq, dk, dv)``; the
    residuals are the inputs, ``o`` and ``lse``. ``cfg`` is static and the segment
    ids get no cotangent.
    """
    @functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
    def flash(q, k, v, qs, ks, cfg):
        return forward(q, k, v, qs, ks, cfg)[0]

    def flash_fwd(q, k, v, qs, ks, cfg):
        o, lse = forward(q, k, v, qs, ks, cfg)
        return o, (q, k, v, qs, ks, o, lse)

    def flash_bwd(cfg, res, do):
        q, k, v, qs, ks, o, lse = res
        dq, dk, dv = backward(q, k, v, qs, ks, o, lse, do, cfg)
        return dq, dk, dv, None, None

    flash.defvjp(flash_fwd, flash_bwd)
    return flash
