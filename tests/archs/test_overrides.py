"""Preset overrides (archs.config.override): a field goes to the components that have it,
an ambiguous field is refused with the places it could go, a kind-qualified field is
applied only to that kind, and hybrids accept their per-family switches."""

import jax
import jax.numpy as jnp
import pytest

import archs


def _kinds(cfg, field):
    return {(i, part): getattr(getattr(spec, part), field)
            for i, spec in enumerate(cfg.pattern) for part in ("mixer", "ffn")
            if getattr(spec, part) is not None and hasattr(getattr(spec, part), field)}


def test_jamba_takes_attn_impl_only_on_its_attention_blocks_and_runs():
    cfg = archs.preset("jamba", "tiny", attn_impl="blockwise")
    set_on = _kinds(cfg, "attn_impl")
    assert set_on and set(set_on.values()) == {"blockwise"}
    assert all(cfg.pattern[i].mixer.kind == "attention" for i, _ in set_on)
    model = archs.build(cfg)
    tokens = jnp.zeros((1, 16), jnp.int32)
    params = jax.jit(model.init)(jax.random.PRNGKey(0), tokens)
    logits, _ = jax.jit(model.apply)(params, tokens)
    assert logits.shape == (1, 16, cfg.vocab_size) and bool(jnp.isfinite(logits).all())


def test_field_of_several_kinds_is_refused_with_the_qualified_names():
    # jamba has a dense FFN and an MoE FFN: both have `hidden`.
    with pytest.raises(ValueError, match=r"ambiguous.*ffn\.hidden.*moe\.hidden"):
        archs.preset("jamba", "tiny", hidden=64)


def test_qualified_field_goes_to_that_kind_only():
    base = archs.preset("jamba", "tiny")
    cfg = archs.preset("jamba", "tiny", **{"moe.hidden": 48})
    for new, old in zip(cfg.pattern, base.pattern):
        if new.ffn is not None and new.ffn.kind == "moe":
            assert new.ffn.hidden == 48
        elif new.ffn is not None:
            assert new.ffn == old.ffn


def test_unknown_field_lists_what_is_settable():
    with pytest.raises(ValueError, match=r"unknown override 'impl'.*settable:.*attention\.attn_impl"):
        archs.preset("llama", "tiny", impl="blockwise")


def test_top_level_and_block_fields():
    cfg = archs.preset("llama", "tiny", n_layers=4, short_conv=4)
    assert cfg.n_layers == 4 and cfg.n_repeats == 4
    assert all(spec.short_conv == 4 for spec in cfg.pattern)
