"""Autoregressive generation: prefill the prompt into a fixed-size cache, then a
jit-compiled ``lax.scan`` decode loop of one token per step (greedy at temperature 0,
otherwise temperature / top-k sampling)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from layers.typing import Array


def sample_token(logits: Array, rng: Array, temperature: float, top_k: int | None) -> Array:
    """logits [B, V] -> tokens [B] int32. Greedy when temperature == 0."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model, params, prompt: Array, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, rng: Array | None = None) -> Array:
    """Returns ``tokens [B, T + max_new_tokens]`` (the prompt included).

    Args:
      model: an ``archs.build(config)`` module (causal).
      params: its parameters (the ``{"params": ...}`` variables dict).
      prompt: [B, T] int32.
      max_new_tokens: tokens to append (>= 0).
      temperature: 0 for greedy; > 0 samples from softmax(logits / temperature).
      top_k: keep only the k most likely tokens when sampling.
      rng: PRNG key, required when temperature > 0.
    """
    cfg = model.cfg
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be [B, T] with T >= 1, got shape {prompt.shape}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0")
    if temperature > 0 and rng is None:
        raise ValueError("rng is required when temperature > 0")
    if top_k is not None and not 0 < top_k <= cfg.vocab_size:
        raise ValueError(f"top_k={top_k} must be in [1, vocab_size={cfg.vocab_size}]")
    if not cfg.causal:
        raise ValueError(f"model {cfg.name!r} is not causal; generation needs a causal decoder")
    total = prompt.shape[1] + max_new_tokens
    if total > cfg.max_len:
        raise ValueError(f"prompt length {prompt.shape[1]} + max_new_tokens {max_new_tokens} = "
                         f"{total} exceeds model.max_len={cfg.max_len}")
    if max_new_tokens == 0:
        return prompt
    rng = jax.random.PRNGKey(0) if rng is None else rng
    return _generate(model, params, prompt.astype(jnp.int32), rng, max_new_tokens,
                     float(temperature), top_k, total)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7))
def _generate(model, params, prompt, rng, max_new_tokens, temperature, top_k, total):
    b = prompt.shape[0]
    cache = model.init_cache(b, total)
    logits, _, cache = model.apply(params, prompt, cache=cache)
    rng, sub = jax.random.split(rng)
    first = sample_token(logits[:, -1], sub, temperature, top_k)

    def step(carry, _):
        tok, cache, rng = carry
        logits, _, cache = model.apply(params, tok[:, None], cache=cache)
        rng, sub = jax.random.split(rng)
        nxt = sample_token(logits[:, -1], sub, temperature, top_k)
        return (nxt, cache, rng), tok

    (last, _, _), toks = jax.lax.scan(step, (first, cache, rng), None, length=max_new_tokens - 1)
    new = jnp.concatenate([toks.T, last[:, None]], axis=1) if max_new_tokens > 1 else last[:, None]
    return jnp.concatenate([prompt, new], axis=1)
