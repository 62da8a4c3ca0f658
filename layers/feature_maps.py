"""Kernel feature maps of linear attention: ``softmax(q k^T)`` replaced by
``phi(q)^T phi(k)`` (Katharopoulos et al. 2020, "Transformers are RNNs", eq. 4-5).

* :func:`elu_feature_map`: ``phi(x) = elu(x) + 1`` (Katharopoulos et al. eq. 7); the
  linear transformer and TransNormer use it.
* FAVOR+ (Choromanski et al. 2021, "Rethinking Attention with Performers"): positive
  orthogonal random features (Lemma 1; orthogonal features Sec. 2.4) for
  ``SM(q, k) = exp(q^T k)``: :func:`orthogonal_gaussian` draws the ``[N, Dh]``
  projection, :func:`favor_features` maps ``x -> exp(w^T x - |x|^2 / 2) / sqrt(N)``.

  *Numerical stabilization* (the paper's code subtracts maxima before ``exp``): a
  per-query constant cancels in the attention ratio, so queries subtract their row
  max (``stop_gradient``). A per-key constant does *not* cancel, and the official
  global max over all keys would look at future keys (breaking decode == forward).
  Keys therefore keep the exact ``exp(w_j^T k - |k|^2/2)``, whose mean over ``w`` is 1,
  so sums stay O(T); it is bounded by ``exp(|w_j|^2 / 2)``, and for features with
  ``|w_j|^2 / 2 > cap`` (cap 40; only when Dh >~ 64) the excess ``s_j`` is moved from
  the key side to the query side (``phi_k,j * exp(-s_j)``, ``phi_q,j * exp(+s_j)``
  before the row max): the product ``phi_q . phi_k`` is unchanged and no key feature
  exceeds ``exp(cap)``.

All maps return fp32. Verified in tests/layers/recurrent/test_linear_mixers.py (the
FAVOR+ estimate approaches causal softmax attention as N grows).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from layers.typing import Array


def elu_feature_map(x: Array) -> Array:
    """phi(x) = elu(x) + 1 > 0 (Katharopoulos et al. eq. 7), in fp32."""
    return jax.nn.elu(x.astype(jnp.float32)) + 1.0


def relu_feature_map(x: Array) -> Array:
    """phi(x) = relu(x) >= 0 (fla's "relu" map), in fp32."""
    return jax.nn.relu(x.astype(jnp.float32))


def identity_feature_map(x: Array) -> Array:
    """phi(x) = x (unnormalized linear attention; signed, so no normalizer), in fp32."""
    return x.astype(jnp.float32)


# Deterministic maps selectable by name (``LinearAttentionConfig.feature_map``).
FEATURE_MAPS = {"elu": elu_feature_map, "relu": relu_feature_map, "identity": identity_feature_map}


def orthogonal_gaussian(key: Array, n_features: int, dim: int, orthogonal: bool = True) -> Array:
    """``[N, Dh]`` projection: stacked blocks of ``Dh`` orthonormal rows (QR of Gaussian
    matrices, sign-corrected to Haar), rows rescaled by independent chi(Dh) norms so
    each row is marginally N(0, I). ``orthogonal=False``: i.i.d. Gaussian rows."""
    k_blocks, k_norms = jax.random.split(key)
    if not orthogonal:
        return jax.random.normal(k_blocks, (n_features, dim), jnp.float32)
    n_blocks = -(-n_features // dim)

    def block(k):
        qm, r = jnp.linalg.qr(jax.random.normal(k, (dim, dim), jnp.float32))
        return (qm * jnp.sign(jnp.diagonal(r))[None, :]).T
    rows = jax.vmap(block)(jax.random.split(k_blocks, n_blocks)).reshape(-1, dim)[:n_features]
    norms = jnp.linalg.norm(jax.random.normal(k_norms, (n_features, dim), jnp.float32), axis=-1)
    return rows * norms[:, None]


def favor_features(x: Array, w: Array, *, is_query: bool, cap: float = 40.0) -> Array:
    """Positive random features of ``x [B, T, H, Dh]`` (already scaled by Dh^-1/4) for
    the projection ``w [N, Dh]``, stabilized as in the module docstring: returns
    ``[B, T, H, N]`` with ``phi_q^T phi_k = exp(q^T k) / N`` times a per-query constant."""
    x = x.astype(jnp.float32)
    w = w.astype(jnp.float32)
    logits = jnp.einsum("bthd,nd->bthn", x, w) - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)
    shift = jnp.maximum(0.5 * jnp.sum(w * w, axis=-1) - cap, 0.0)   # [N], 0 unless |w|^2/2 > cap
    if is_query:
        logits = logits + shift
        logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    else:
        logits = logits - shift
    return jnp.exp(logits) * (w.shape[0] ** -0.5)
