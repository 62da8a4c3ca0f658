"""Multi-head plumbing shared by every multi-head mixer: one head config, one
projection layout, one set of logical axis names.

* :class:`HeadsConfig`: ``n_heads`` (H), ``n_kv_heads`` (K; None = H, i.e. MHA; 1 = MQA)
  and ``head_dim`` (Dh; None = D / H), with :meth:`HeadsConfig.validate_heads`.
* :func:`project_heads`: ``[B, T, D] -> [B, T, n, Dh]`` with the kernel ``[D, n, Dh]``
  (logical axes ``("embed", "heads" | "kv_heads", "head_dim")``) and an optional bias
  ``[n, Dh]``; :func:`project_out`: ``[B, T, H, Dh] -> [B, T, D]`` with ``[H, Dh, D]``
  (``("heads", "head_dim", "embed")``). Every multi-head mixer creates its q/k/v/o
  parameters through these two, so the same concept has the same layout and the
  same sharding rules in every family.
* :func:`dense`: the plain (non-head) projection ``[..., D_in] -> [..., F]`` with a
  logically partitioned kernel, for gates, FFNs and fused input projections.
* :func:`group_queries` / :func:`expand_kv`: GQA layouts. Queries are grouped
  ``[B, T, K, G, Dh]`` (G = H / K) so K/V are never repeated per query head; the
  explicit repeat is only for references and small decode paths.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from layers import initializers as init
from layers.contracts import positive
from layers.typing import Array


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """Mixin for multi-head configs (fields with defaults; put it after the base config)."""
    n_heads: int = 4
    n_kv_heads: int | None = None        # None: n_heads (MHA); 1: MQA
    head_dim: int | None = None          # None: d_model // n_heads

    @property
    def kv_heads(self) -> int:
        """K, the number of key/value heads."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    def head_dim_for(self, d_model: int) -> int:
        """Dh for a model of width ``d_model``."""
        return self.head_dim if self.head_dim is not None else d_model // self.n_heads

    def validate_heads(self, d_model: int, path: str, *, even_head_dim: str | None = None) -> None:
        """Checks H, K, Dh; ``even_head_dim`` names the feature that needs an even Dh."""
        positive(f"{path}.n_heads", self.n_heads)
        positive(f"{path}.n_kv_heads", self.n_kv_heads, allow_none=True)
        positive(f"{path}.head_dim", self.head_dim, allow_none=True)
        if self.n_heads % self.kv_heads:
            raise ValueError(f"{path}.n_heads={self.n_heads} must be divisible by "
                             f"{path}.n_kv_heads={self.kv_heads} (each kv head serves a group "
                             "of query heads)")
        if self.head_dim is None and d_model % self.n_heads:
            raise ValueError(f"model.d_model={d_model} must be divisible by {path}.n_heads="
                             f"{self.n_heads} (or set {path}.head_dim explicitly)")
        if even_head_dim and self.head_dim_for(d_model) % 2:
            raise ValueError(f"{path}.head_dim: head dim {self.head_dim_for(d_model)} is odd; "
                             f"{even_head_dim} rotates channel pairs and needs an even head dim")


def head_kernel(mod: nn.Module, name: str, d_in: int, n: int, dh: int, kv: bool = False) -> Array:
    """The ``[D, n, Dh]`` projection kernel ``name`` of ``mod`` (fan-in init over D)."""
    axes = ("embed", "kv_heads" if kv else "heads", "head_dim")
    return init.param(mod, name, init.fan_in(1.0, in_axis=0, out_axis=(1, 2)), (d_in, n, dh), axes)


def project_heads(mod: nn.Module, x: Array, n: int, dh: int, name: str, *, kv: bool = False,
                  bias: bool = False) -> Array:
    """``x [B, T, D] -> [B, T, n, Dh]`` in ``mod.dtype`` through kernel ``name`` (and bias
    ``{name}_bias [n, Dh]``). ``kv`` selects the ``kv_heads`` logical axis."""
    w = head_kernel(mod, name, x.shape[-1], n, dh, kv)
    y = jnp.einsum("btd,dnh->btnh", x.astype(mod.dtype), w.astype(mod.dtype))
    if bias:
        b = init.param(mod, f"{name}_bias", init.zeros, (n, dh),
                       ("kv_heads" if kv else "heads", "head_dim"))
        y = y + b.astype(mod.dtype)
    return y


def project_out(mod: nn.Module, out: Array, d_model: int, name: str = "o", *,
                bias: bool = False) -> Array:
    """``out [B, T, H, Dh] -> [B, T, D]`` through the ``[H, Dh, D]`` kernel ``name``."""
    h, dh = out.shape[2:]
    w = init.param(mod, name, init.fan_in(1.0, in_axis=(0, 1), out_axis=2), (h, dh, d_model),
                   ("heads", "head_dim", "embed"))
    y = jnp.einsum("bthd,hdm->btm", out.astype(mod.dtype), w.astype(mod.dtype))
    if bias:
        y = y + init.param(mod, f"{name}_bias", init.zeros, (d_model,), ("embed",)).astype(mod.dtype)
    return y


def group_queries(q: Array, kv_heads: int) -> Array:
    """``q [B, T, H, Dh] -> [B, T, K, G, Dh]`` (query heads grouped by their kv head)."""
    b, t, h, dh = q.shape
    return q.reshape(b, t, kv_heads, h // kv_heads, dh)


def expand_kv(x: Array, groups: int, axis: int = 2) -> Array:
    """Repeats each kv head ``groups`` (= G) times along ``axis``: ``[.., K, ..] -> [.., K*G, ..]``.
    For references and small decode paths; fast paths use :func:`group_queries`."""
    return x if groups == 1 else jnp.repeat(x, groups, axis=axis)


def dense(features: int, axes: tuple[str | None, str | None], dtype, param_dtype, name: str,
          use_bias: bool = False, stddev: float | None = None) -> nn.Dense:
    """A ``nn.Dense`` with logical axes ``axes`` on its kernel, fan-in init (or
    ``normal(stddev)``) and zero bias."""
    k_init = init.normal(stddev) if stddev is not None else init.fan_in()
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=nn.with_logical_partitioning(k_init, axes),
                    bias_init=nn.with_logical_partitioning(init.zeros, axes[1:]), name=name)
