"""The generic decoder LM (docs/design.md): embedding -> blocks from a pattern -> final norm
-> (tied) head, returning ``(logits, aux)``.

* ``aux = {"losses": {name: scalar}, "metrics": {name: [n_repeats, ...]}}``: auxiliary
  losses (summed over layers; the train loop adds them to the task loss) and
  diagnostics (stacked over pattern repeats, one key per block of the pattern)
  produced by mixers and FFNs (both follow ``layers.contracts``).
* Decoding: ``model.init_cache(batch, max_len)`` builds the cache pytree
  :class:`DecodeCache`; ``model.apply(params, tokens, cache=cache)``
  returns ``(logits, aux, new_cache)``.
* With ``scan_layers`` the repeating pattern runs under ``nn.scan`` (parameters get a
  leading ``layers`` axis) wrapped in ``nn.remat`` with the configured policy;
  otherwise repeats are unrolled as ``layers_0 ... layers_{n-1}`` (same math; tests
  check scanned == unrolled).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
from flax import struct
import jax
import jax.numpy as jnp

from archs.config import BlockSpec, ModelConfig
from layers.contracts import Aux
from layers.conv import ShortConv
from layers.embed import Embedding
from layers.norms import make_norm
from layers.typing import Array

# RNG streams the train loop provides when ``train=True`` (noisy routing, feature redraws, dropout).
RNG_STREAMS = ("dropout", "noise", "features")
# Non-gradient variables (e.g. the aux-loss-free router bias) live in this collection;
# the train loop applies the model with it mutable and stores the new values after
# the optimizer step.
STATE_COLLECTION = "state"

REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def segment_positions(segment_ids: Array) -> Array:
    """Positions restarting at 0 at every segment start. segment_ids: [B, T] -> [B, T]."""
    t = segment_ids.shape[1]
    idx = jnp.arange(t)[None, :]
    change = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    start = jax.lax.cummax(jnp.where(change, idx, 0), axis=1)
    return (idx - start).astype(jnp.int32)


@struct.dataclass
class DecodeCache:
    """The model's decode cache: ``index`` tokens written so far (int32 []), the
    per-block caches ``{"mixer", "ffn", "conv"}`` (stacked over repeats when scanned),
    and the static length."""
    index: Array
    layers: Any
    max_len: int = struct.field(pytree_node=False)


def _add_aux(losses: dict, metrics: dict, aux: Aux, where: str) -> None:
    """Sums ``aux``'s losses into ``losses``; keys its metrics ``name/where``."""
    for name, val in aux.get("losses", {}).items():   # summed over blocks
        losses[name] = losses.get(name, 0.0) + val
    for name, val in aux.get("metrics", {}).items():  # kept per block
        metrics[f"{name}/{where}"] = val


class Block(nn.Module):
    """``x + mixer(conv?(norm(x)))`` then ``x + ffn(norm(x))``; mixer and FFN follow the
    same contract (``layers.contracts``): ``(y, new_cache, aux)``. Metrics are keyed
    ``name/block_{index}`` (FFN) and ``name/block_{index}/mixer`` (mixer)."""
    spec: BlockSpec
    cfg: ModelConfig
    index: int = 0

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, train):
        cfg, spec = self.cfg, self.spec
        dt, pdt = cfg.compute_dtype, jnp.dtype(cfg.param_dtype)
        part = lambda key: None if cache is None else cache[key]
        h = make_norm(cfg.norm, cfg.norm_eps, dt, pdt, name="mixer_norm")(x)
        new_cache, losses, metrics = {}, {}, {}
        if spec.short_conv:
            h, new_cache["conv"] = ShortConv(spec.short_conv, dt, pdt, name="short_conv")(
                h, part("conv"), segment_ids)
        y, new_cache["mixer"], aux = spec.mixer.make(cfg.d_model, dt, pdt, name="mixer")(
            h, positions=positions, segment_ids=segment_ids, cache=part("mixer"), train=train)
        _add_aux(losses, metrics, aux, f"block_{self.index}/mixer")
        x = x + y.astype(x.dtype)
        if spec.ffn is not None:
            h = make_norm(cfg.norm, cfg.norm_eps, dt, pdt, name="ffn_norm")(x)
            y, new_cache["ffn"], aux = spec.ffn.make(cfg.d_model, dt, pdt, name="ffn")(
                h, positions=positions, segment_ids=segment_ids, cache=part("ffn"), train=train)
            _add_aux(losses, metrics, aux, f"block_{self.index}")
            x = x + y.astype(x.dtype)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, (new_cache if cache is not None else None), {"losses": losses, "metrics": metrics}


class Repeat(nn.Module):
    """One repetition of the pattern: ``len(pattern)`` blocks in sequence."""
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, cache, train=False):
        caches, losses, metrics = [], {}, {}
        for i, spec in enumerate(self.cfg.pattern):
            x, c, aux = Block(spec, self.cfg, i, name=f"block_{i}")(
                x, positions, segment_ids, None if cache is None else cache[i], train)
            caches.append(c)
            for name, val in aux["losses"].items():
                losses[name] = losses.get(name, 0.0) + val
            metrics.update(aux["metrics"])
        return x, ((tuple(caches) if cache is not None else None),
                   {"losses": losses, "metrics": metrics})


class LM(nn.Module):
    """Decoder language model: tokens [B, T] int32 -> (logits [B, T, V] fp32, aux).

    ``train=True`` enables training-only randomness (noisy routing, feature redraws),
    drawn from the RNG streams in ``RNG_STREAMS`` passed to ``apply(..., rngs=...)``.
    """
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        dt, pdt = cfg.compute_dtype, jnp.dtype(cfg.param_dtype)
        # An unscaled tied head gets a D^-1/2 table so logits start O(1) either way.
        unscaled_tied = cfg.tie_embeddings and cfg.tied_head_scale == "none"
        scale = cfg.d_model ** -0.5 if cfg.tied_head_scale == "rsqrt_d" else 1.0
        self.embed = Embedding(cfg.vocab_size, cfg.d_model, dt, pdt, head_scale=scale,
                               init_std=cfg.d_model ** -0.5 if unscaled_tied else 1.0)
        if cfg.embed_norm:
            self.embed_norm = make_norm(cfg.norm, cfg.norm_eps, dt, pdt)
        repeat = Repeat
        if cfg.remat != "none":
            repeat = nn.remat(Repeat, policy=REMAT[cfg.remat], prevent_cse=not cfg.scan_layers,
                             static_argnums=(5,))
        if cfg.scan_layers:
            scanned = nn.scan(repeat, variable_axes={"params": 0, STATE_COLLECTION: 0},
                              split_rngs={"params": True, **{r: True for r in RNG_STREAMS}},
                              in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), out_axes=0,
                              length=cfg.n_repeats, metadata_params={nn.PARTITION_NAME: "layers"})
            self.layers = scanned(cfg)
        else:
            self.layers = [repeat(cfg) for _ in range(cfg.n_repeats)]
        self.final_norm = make_norm(cfg.norm, cfg.norm_eps, dt, pdt)
        if not cfg.tie_embeddings:
            init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal")
            self.head = nn.Dense(cfg.vocab_size, use_bias=False, dtype=dt, param_dtype=pdt,
                                 kernel_init=nn.with_logical_partitioning(init, ("embed", "vocab")))

    def __call__(self, tokens: Array, *, positions: Array | None = None,
                 segment_ids: Array | None = None, cache: DecodeCache | None = None,
                 train: bool = False):
        cfg = self.cfg
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T] int32, got shape {tokens.shape}")
        b, t = tokens.shape
        limit = cfg.max_len if cache is None else cache.max_len
        if t > limit:
            raise ValueError(f"sequence length T={t} exceeds "
                             f"{'model.max_len' if cache is None else 'the cache length'}={limit}")
        if positions is None:
            if segment_ids is not None:
                positions = segment_positions(segment_ids)
            else:
                start = 0 if cache is None else cache.index
                positions = jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))
        x = self.embed(tokens)
        if cfg.embed_norm:
            x = self.embed_norm(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        layer_cache = None if cache is None else cache.layers
        if cfg.scan_layers:
            x, (new_layers, aux) = self.layers(x, positions, segment_ids, layer_cache, train)
            aux = {"losses": {k: v.sum() for k, v in aux["losses"].items()},
                   "metrics": aux["metrics"]}
        else:
            new_layers, auxes = [], []
            for i, rep in enumerate(self.layers):
                x, (c, a) = rep(x, positions, segment_ids,
                                None if cache is None else layer_cache[i], train)
                new_layers.append(c)
                auxes.append(a)
            aux = {"losses": {k: sum(a["losses"][k] for a in auxes) for k in auxes[0]["losses"]},
                   "metrics": {k: jnp.stack([a["metrics"][k] for a in auxes])
                               for k in auxes[0]["metrics"]}}
        x = self.final_norm(x)
        logits = self.embed.attend(x) if cfg.tie_embeddings else self.head(x).astype(jnp.float32)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        if cache is None:
            return logits, aux
        return logits, aux, DecodeCache(cache.index + t, new_layers, cache.max_len)

    @nn.nowrap
    def init_cache(self, batch: int, max_len: int | None = None) -> DecodeCache:
        """Decode cache for ``batch`` sequences of up to ``max_len`` (default cfg.max_len) tokens."""
        cfg = self.cfg
        max_len = cfg.max_len if max_len is None else max_len
        if max_len > cfg.max_len:
            raise ValueError(f"init_cache: max_len={max_len} exceeds model.max_len={cfg.max_len}")
        dt = cfg.compute_dtype

        def block_cache(spec: BlockSpec):
            c = {"mixer": spec.mixer.init_cache(cfg.d_model, batch, max_len, dt)}
            if spec.ffn is not None:
                c["ffn"] = spec.ffn.init_cache(cfg.d_model, batch, max_len, dt)
            if spec.short_conv:
                c["conv"] = jnp.zeros((batch, spec.short_conv - 1, cfg.d_model), dt)
            return c
        unit = tuple(block_cache(s) for s in cfg.pattern)
        if cfg.scan_layers:
            layers = jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.n_repeats,) + x.shape), unit)
        else:
            layers = [unit for _ in range(cfg.n_repeats)]
        return DecodeCache(jnp.zeros((), jnp.int32), layers, max_len)

    @nn.nowrap
    def state_size(self, seq_len: int, dtype=None) -> int:
        """Bytes of decode state per sequence at context ``seq_len`` (all layers)."""
        cfg = self.cfg
        dt = cfg.compute_dtype if dtype is None else dtype
        per_repeat = sum(s.mixer.state_size(cfg.d_model, seq_len, dt)
                         + (0 if s.ffn is None else s.ffn.state_size(cfg.d_model, seq_len, dt))
                         + (s.short_conv - 1) * cfg.d_model * jnp.dtype(dt).itemsize * bool(s.short_conv)
                         for s in cfg.pattern)
        return per_repeat * cfg.n_repeats

