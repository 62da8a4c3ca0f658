"""The ``deepseek_v3`` preset: the published 671B shape (abstractly) with its first-k dense
layers, and the HF golden fixture (tests/fixtures/hf/deepseek_v3): logits, KV-cache greedy
decoding (tokens and step logits) vs transformers, the to_hf / from_hf round trip, and the published config.json."""

import dataclasses
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import archs
from archs.hf import deepseek_v3, from_hf, to_hf
from layers.ffn import FFNConfig
from layers.moe import MoEConfig
from tests.helpers import rel_rms

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "hf" / "deepseek_v3"


def test_671b_shape_builds_abstractly():
    cfg = archs.preset("deepseek_v3", "671b")
    assert [type(s.ffn) for s in cfg.pattern] == [FFNConfig] * 3 + [MoEConfig] * 58
    model = archs.build(cfg)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    params = flax.core.meta.unbox(shapes)["params"]
    # DeepSeek-V3's 671B total parameters (the main model, without the MTP module)
    assert sum(x.size for x in jax.tree.leaves(params)) == 671_026_404_352
    mixer, moe = params["layers"]["block_0"]["mixer"], params["layers"]["block_3"]["ffn"]
    assert mixer["q_b"].shape == (1, 1536, 128, 192)
    assert mixer["kv_a"]["kernel"].shape == (1, 7168, 512 + 64)
    assert mixer["kv_b"].shape == (1, 512, 128, 256)
    assert mixer["o"].shape == (1, 128, 128, 7168)
    assert moe["wi"].shape == (1, 256, 7168, 2048) and moe["router"].shape == (1, 7168, 256)
    assert params["layers"]["block_0"]["ffn"]["wi"]["kernel"].shape == (1, 7168, 18432)
    # decode state: the latent (512) + the rope key part (64) per token and layer, bf16
    assert model.state_size(1000) == 1000 * 61 * (512 + 64) * 2


def test_tiny_is_under_a_million_parameters_with_a_dense_first_layer():
    cfg = archs.preset("deepseek_v3", "tiny")
    assert [type(s.ffn) for s in cfg.pattern] == [FFNConfig, MoEConfig]
    shapes = jax.eval_shape(archs.build(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    assert sum(x.size for x in jax.tree.leaves(shapes["params"])) < 1_000_000


def test_hf_golden_logits_greedy_and_round_trip(tmp_path):
    cfg, variables = from_hf(FIXTURE)
    ref = np.load(FIXTURE / "reference.npz")
    assert set(variables) == {"params", "state"}   # the router selection bias is loaded
    model = archs.build(cfg)
    logits, _ = jax.jit(model.apply)(variables, jnp.asarray(ref["input_ids"]))
    err = np.linalg.norm(np.asarray(logits, np.float64) - ref["logits"]) / np.linalg.norm(ref["logits"])
    assert err <= 1e-4, err
    # greedy decoding through the latent KV cache (MLA's absorbed path): prefill 8 tokens,
    # then one token per step; the step logits are compared with HF's cached decode too
    step = jax.jit(lambda c, tok: model.apply(variables, tok, cache=c))
    logits, _, cache = step(model.init_cache(2, 16), jnp.asarray(ref["input_ids"][:, :8]))
    tokens, step_logits = [], []
    for _ in range(8):
        step_logits.append(logits[:, -1])
        tokens.append(jnp.argmax(logits[:, -1], -1))
        logits, _, cache = step(cache, tokens[-1][:, None])
    np.testing.assert_array_equal(np.stack(tokens, 1), ref["greedy"])
    assert rel_rms(jnp.stack(step_logits, 1), ref["greedy_logits"]) <= 1e-4
    to_hf(cfg, variables, tmp_path)
    cfg2, variables2 = from_hf(tmp_path)
    assert cfg2 == cfg
    for a, b in zip(jax.tree.leaves(variables), jax.tree.leaves(variables2)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_published_config_json_loads_as_the_671b_preset():
    hf = {  # DeepSeek-V3's config.json (transformers v4 layout; bf16 weights, no fp8 block)
        "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1,
        "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu", "hidden_size": 7168,
        "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
        "max_position_embeddings": 163840, "model_type": "deepseek_v3",
        "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
        "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128,
        "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
        "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                         "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "seq_aux": True, "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
        "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
        "v_head_dim": 128, "vocab_size": 129280}
    cfg = deepseek_v3.config_from_hf(hf)
    assert dataclasses.replace(cfg, name="deepseek_v3", dtype="bfloat16") == archs.preset(
        "deepseek_v3", "671b")
    with pytest.raises(ValueError, match="'scoring_func'='softmax' is not supported"):
        deepseek_v3.config_from_hf({**hf, "scoring_func": "softmax"})
    with pytest.raises(ValueError, match="quantization_config"):
        deepseek_v3.config_from_hf({**hf, "quantization_config": {"quant_method": "fp8"}})
