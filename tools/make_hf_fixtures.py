"""Generate the HuggingFace golden fixtures under ``tests/fixtures/hf/``.

Each fixture is a *tiny random* HuggingFace ``transformers`` causal LM, built in fp32 from a fixed
seed and saved with ``save_pretrained(..., safe_serialization=True)`` (``config.json`` +
``model.safetensors``; one fixture is sharded with an index file), together with
``reference.npz`` holding what the PyTorch reference computes on it:

* ``input_ids``      [B=2, T=16] int32, random tokens in ``[3, V)``.
* ``logits``         [2, 16, V] fp32, ``model(input_ids).logits`` (one full forward, no cache).
* ``greedy``         [2, 8] int32, ``model.generate(input_ids[:, :8], **GENERATE_KWARGS)``: 8 tokens
  decoded greedily through HF's KV / recurrent-state cache.
* ``greedy_logits``  [2, 8, V] fp32, the raw logits of each of those 8 decode steps.
* ``greedy_nocache`` [2, 8] int32, the same greedy continuation recomputed with a full forward
  over the whole prefix at every step (``use_cache=False``). It equals ``greedy`` for every
  fixture except where HF's cached decode is itself position-history dependent (``dynamic`` RoPE:
  cached keys keep the frequencies of the length they were computed at).
* ``meta``           0-d unicode array holding a JSON object: fixture name, HF model type, seeds,
  generate kwargs, torch / transformers / safetensors / numpy versions, the smallest top-1 vs
  top-2 logit gap on the greedy path, and notes.

Models run on CPU with ``attn_implementation="eager"``; Mamba, Mamba-2 and Jamba use their
pure-PyTorch paths (the script refuses to run if ``mamba_ssm`` or ``causal_conv1d`` is
importable, since transformers would then dispatch to those kernels).

The initialisation is HF's own ``_init_weights`` with a larger ``initializer_range`` (so logits are
far from uniform; Mamba's time-step range is raised to 0.01-0.5), followed by a seeded perturbation
of every 1-D parameter (norm scales, biases, ``D``, ``dt_bias``, ...), of Mamba's ``A_log`` and of
DeepSeek-V3's ``e_score_correction_bias`` buffer, so a loader that drops or re-derives any of them
cannot match. Input ids are re-drawn (seed + 1, ...) until every greedy step has
a top-1 / top-2 logit gap of at least ``MIN_GREEDY_MARGIN``, so the greedy check is not decided by
fp32 rounding.

Not run in CI (tests read the committed files with ``safetensors.numpy`` only). Regenerate with
``make hf-fixtures`` (which builds ``.venv-hf`` with the ``hf`` extra) or::

    .venv-hf/bin/python tools/make_hf_fixtures.py --out tests/fixtures/hf
    .venv-hf/bin/python tools/make_hf_fixtures.py --out tests/fixtures/hf --check   # determinism

Verified: running it twice gives bit-identical files (``--check``) on one machine (CPU, torch
threads = 1). Not checked across machines: the weights come from torch's CPU generator and should
not change, but the reference logits may differ in the last bits on another CPU or library build.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

BATCH = 2
SEQ = 16
PROMPT = 8
NEW_TOKENS = 8
MIN_GREEDY_MARGIN = 1e-2
SHARD_SIZE = "100KB"
GENERATE_KWARGS: dict[str, Any] = dict(
    do_sample=False,
    num_beams=1,
    max_new_tokens=NEW_TOKENS,
    min_new_tokens=NEW_TOKENS,
    use_cache=True,
    eos_token_id=None,
    pad_token_id=0,
    # the attention mask is all ones (no padding); passed explicitly
)


@dataclasses.dataclass(frozen=True)
class Fixture:
    """One tiny model: its directory name, HF model type, config overrides and notes."""

    name: str
    model_type: str
    config: dict[str, Any]
    seed: int
    sharded: bool = False
    notes: str = ""


_LLAMA = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    initializer_range=0.2,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
)


def _llama(**kw: Any) -> dict[str, Any]:
    return {**_LLAMA, **kw}


FIXTURES: list[Fixture] = [
    Fixture("llama", "llama", _llama(rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), 1,
            notes="GQA 4 query heads / 2 kv heads, head_dim 8, untied head, default RoPE"),
    Fixture("llama_tied", "llama",
            _llama(tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), 2,
            notes="tied head: logits = norm(h) @ embed_tokens.weight.T, no lm_head.weight in the file"),
    Fixture("llama_rope_linear", "llama", _llama(
        head_dim=16, rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}), 3,
            notes="explicit head_dim 16 (4 heads x 16 = 64 != hidden 32); positions divided by factor"),
    Fixture("llama_rope_dynamic", "llama", _llama(
        head_dim=16, max_position_embeddings=8,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), 4,
            notes="dynamic NTK with max_position_embeddings 8: the 16-token forward uses the base for "
                  "seq_len 16; the cached decode rotates each new token with the base for its own "
                  "seq_len (pos + 1), cached keys keep theirs, so greedy != greedy_nocache is possible"),
    Fixture("llama_rope_yarn", "llama", _llama(
        head_dim=16, max_position_embeddings=16384,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 4096, "beta_fast": 32.0, "beta_slow": 1.0}), 5,
            notes="YaRN: dimension-index ramp between floor/ceil-rounded correction dims, cos/sin scaled "
                  "by attention_factor = 0.1 ln(factor) + 1"),
    Fixture("llama_rope_llama3", "llama", _llama(
        head_dim=16, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}), 6,
            notes="Llama-3.1 frequency bands; with head_dim 16 and theta 5e5 the 8 frequencies fall in all "
                  "three bands (kept / smoothed / divided by factor); tied head like Llama-3.2 1B/3B"),
    Fixture("mistral", "mistral", _llama(
        head_dim=16, sliding_window=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), 7,
            notes="sliding_window 8 (query i sees keys i-7..i), explicit head_dim 16"),
    Fixture("mixtral", "mixtral", _llama(
        num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0, sliding_window=None,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 1e6}), 8, sharded=True,
            notes="sharded checkpoint (model.safetensors.index.json); softmax router, top-2 renormalised"),
    Fixture("qwen2", "qwen2", _llama(
        use_sliding_window=False, bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}), 9,
            notes="q/k/v projections have biases, o_proj does not"),
    Fixture("qwen2_moe", "qwen2_moe", _llama(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True,
        use_sliding_window=False, bos_token_id=None, eos_token_id=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}), 10,
            notes="softmax router, top-2 NOT renormalised (norm_topk_prob False, as Qwen1.5-MoE); "
                  "shared expert gated by sigmoid(shared_expert_gate(x))"),
    Fixture("deepseek_v3", "deepseek_v3", _llama(
        num_key_value_heads=4, intermediate_size=64, moe_intermediate_size=16,
        n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, first_k_dense_replace=1,
        q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        rope_interleave=True, bos_token_id=0, eos_token_id=1,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}), 11,
            notes="MLA (q_lora_rank 24, kv_lora_rank 16, nope 8 + rope 4, v 8), layer 0 dense MLP, "
                  "layer 1 MoE (sigmoid router + correction bias, 2 groups, top-1 group, top-2 experts, "
                  "renormalised, x2.5) + 1 shared expert"),
    Fixture("mamba", "mamba", dict(
        vocab_size=96, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2, conv_kernel=4,
        time_step_rank="auto", time_step_min=0.01, time_step_max=0.5, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
        initializer_range=0.2, residual_in_fp32=True, tie_word_embeddings=True, use_mambapy=False,
        pad_token_id=0, bos_token_id=0, eos_token_id=0), 12,
            notes="tied head; dt_rank ceil(32/16) = 2; discretisation A_bar = exp(dt A), B_bar = dt B"),
    Fixture("mamba2", "mamba2", dict(
        vocab_size=96, hidden_size=32, num_heads=8, head_dim=8, state_size=8, n_groups=2, num_hidden_layers=2,
        expand=2, conv_kernel=4, chunk_size=8, time_step_min=0.01, time_step_max=0.5, use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
        initializer_range=0.2, residual_in_fp32=True, tie_word_embeddings=True,
        time_step_limit=(0.0, float("inf")), pad_token_id=0, bos_token_id=0, eos_token_id=0), 13,
            notes="8 heads x head_dim 8 = expand*hidden = 64, 2 B/C groups, chunk_size 8 (two chunks in the "
                  "16-token forward), gated RMSNorm over groups of 64/2 channels, tied head"),
    Fixture("jamba", "jamba", dict(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, expert_layer_period=2,
        expert_layer_offset=1, attn_layer_period=4, attn_layer_offset=2,
        mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank="auto", mamba_conv_bias=True,
        mamba_proj_bias=False, rms_norm_eps=1e-6, initializer_range=0.2, tie_word_embeddings=False,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2), 14,
            notes="layers: 0 mamba+MLP, 1 mamba+MoE, 2 attention(no RoPE)+MLP, 3 mamba+MoE; "
                  "dt/B/C RMS-normalised after x_proj; softmax router top-2 not renormalised"),
]


def _versions() -> dict[str, str]:
    import safetensors
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "safetensors": safetensors.__version__,
        "numpy": np.__version__,
        "python": sys.version.split()[0],
    }


def _perturb(model: Any, seed: int) -> None:
    """Adds seeded noise to every 1-D parameter, to Mamba's A_log and to DeepSeek's routing-bias buffer."""
    import torch

    gen = torch.Generator().manual_seed(10_000 + seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if param.ndim == 1 or name.endswith("A_log"):
                param.add_(0.1 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
        for name, buf in sorted(model.named_buffers()):
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=gen, dtype=buf.dtype))


def _load(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    return model


def _greedy(path: Path, prompt: Any) -> tuple[np.ndarray, np.ndarray]:
    import torch

    model = _load(path)
    with torch.no_grad():
        out = model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            output_logits=True,
            return_dict_in_generate=True,
            **GENERATE_KWARGS,
        )
    tokens = out.sequences[:, prompt.shape[1]:].numpy().astype(np.int32)
    step_logits = torch.stack(out.logits, dim=1).numpy().astype(np.float32)
    return tokens, step_logits


def _greedy_nocache(path: Path, prompt: Any) -> np.ndarray:
    import torch

    model = _load(path)
    seq = prompt
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            logits = model(seq, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq[:, prompt.shape[1]:].numpy().astype(np.int32)


def _margin(step_logits: np.ndarray) -> float:
    top2 = np.sort(step_logits, axis=-1)[..., -2:]
    return float((top2[..., 1] - top2[..., 0]).min())


def build(fx: Fixture, out_dir: Path, versions: dict[str, str], date: str) -> dict[str, Any]:
    """Builds, saves and references one fixture; returns a summary row."""
    import torch
    from safetensors.numpy import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(fx.seed)
    config = AutoConfig.for_model(fx.model_type, **fx.config)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    _perturb(model, fx.seed)
    model.eval()

    path = out_dir / fx.name
    if path.exists():   # replace only a fixture this tool wrote (it has reference.npz + params.txt)
        if not ((path / "reference.npz").is_file() and (path / "params.txt").is_file()):
            raise SystemExit(f"refusing to replace {path}: it is not a fixture written by this tool "
                             "(no reference.npz and params.txt); choose another --out")
        shutil.rmtree(path)
    kwargs: dict[str, Any] = {"safe_serialization": True}
    if fx.sharded:
        kwargs["max_shard_size"] = SHARD_SIZE
    model.save_pretrained(path, **kwargs)

    # The saved files must reproduce the in-memory model exactly.
    reloaded = _load(path)
    ours = model.state_dict()
    theirs = reloaded.state_dict()
    for name, value in ours.items():
        if not torch.equal(value, theirs[name]):
            raise RuntimeError(f"{fx.name}: {name} differs after save/load")
    del reloaded

    vocab = config.vocab_size
    input_seed = 1000 + fx.seed
    for attempt in range(50):
        rng = np.random.default_rng(input_seed + attempt)
        input_ids = rng.integers(3, vocab, size=(BATCH, SEQ)).astype(np.int32)
        prompt = torch.from_numpy(input_ids[:, :PROMPT].astype(np.int64))
        greedy, step_logits = _greedy(path, prompt)
        if _margin(step_logits) >= MIN_GREEDY_MARGIN:
            break
    else:
        raise RuntimeError(f"{fx.name}: no input draw gave a greedy margin >= {MIN_GREEDY_MARGIN}")
    used_seed = input_seed + attempt

    model = _load(path)
    with torch.no_grad():
        logits = model(torch.from_numpy(input_ids.astype(np.int64))).logits.numpy().astype(np.float32)
    if logits.shape != (BATCH, SEQ, vocab):
        raise RuntimeError(f"{fx.name}: logits shape {logits.shape}")
    greedy_nocache = _greedy_nocache(path, prompt)

    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    meta = {
        "fixture": fx.name,
        "model_type": fx.model_type,
        "architecture": type(model).__name__,
        "config_overrides": fx.config,
        "weight_seed": fx.seed,
        "input_seed": used_seed,
        "init": "HF _init_weights (initializer_range as in config) + 0.1 * N(0,1) on every 1-D parameter"
                " and on A_log"
                + (" and on e_score_correction_bias" if fx.model_type == "deepseek_v3" else ""),
        "input_ids": f"numpy default_rng(input_seed).integers(3, vocab_size, size=({BATCH}, {SEQ}))",
        "logits": "model(input_ids).logits, fp32, CPU, attn_implementation='eager'",
        "greedy": f"model.generate(input_ids[:, :{PROMPT}], attention_mask=ones, **generate_kwargs)",
        "generate_kwargs": GENERATE_KWARGS,
        "greedy_min_margin": _margin(step_logits),
        "greedy_equals_nocache": bool((greedy == greedy_nocache).all()),
        "logits_std": float(logits.std()),
        "mean_max_prob": float(probs.max(-1).mean()),
        "sharded": fx.sharded,
        "versions": versions,
        "date": date,
        "notes": fx.notes,
    }
    np.savez(
        path / "reference.npz",
        input_ids=input_ids,
        logits=logits,
        greedy=greedy,
        greedy_logits=step_logits,
        greedy_nocache=greedy_nocache,
        meta=np.array(json.dumps(meta, sort_keys=True)),
    )

    shapes = {}
    for file in sorted(path.glob("*.safetensors")):
        for key, value in load_file(file).items():
            shapes[key] = (list(value.shape), str(value.dtype))
    (path / "params.txt").write_text("".join(f"{k} {tuple(s)} {d}\n" for k, (s, d) in sorted(shapes.items())))
    size = sum(f.stat().st_size for f in path.iterdir())
    return {"name": fx.name, "bytes": size, "params": sum(int(np.prod(s)) for s, _ in shapes.values()),
            "logits_std": meta["logits_std"], "mean_max_prob": meta["mean_max_prob"],
            "margin": meta["greedy_min_margin"], "greedy_eq_nocache": meta["greedy_equals_nocache"],
            "input_seed": used_seed}


def _compare(a: Path, b: Path) -> list[str]:
    """Lists every difference between two fixture trees (bitwise for tensors and arrays)."""
    from safetensors.numpy import load_file

    problems = []
    names_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    names_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    if names_a != names_b:
        problems.append(f"file lists differ: {sorted(set(names_a) ^ set(names_b))}")
    for name in sorted(set(names_a) & set(names_b)):
        fa, fb = a / name, b / name
        if name.endswith(".safetensors"):
            ta, tb = load_file(fa), load_file(fb)
            if ta.keys() != tb.keys() or any(not np.array_equal(ta[k], tb[k]) for k in ta):
                problems.append(f"{name}: tensors differ")
        elif name.endswith(".npz"):
            with np.load(fa) as za, np.load(fb) as zb:
                for key in za.files:
                    if key == "meta":
                        ma, mb = json.loads(str(za[key])), json.loads(str(zb[key]))
                        ma.pop("date", None), mb.pop("date", None)
                        if ma != mb:
                            problems.append(f"{name}: meta differs")
                    elif not np.array_equal(za[key], zb[key]):
                        problems.append(f"{name}: {key} differs")
        elif name != "README.md" and fa.read_bytes() != fb.read_bytes():
            problems.append(f"{name}: bytes differ")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures/hf"))
    parser.add_argument("--only", nargs="*", default=None, help="fixture names (default: all)")
    parser.add_argument("--check", action="store_true",
                        help="regenerate into a temporary folder and compare bitwise with --out")
    args = parser.parse_args(argv)

    for kernel_pkg in ("mamba_ssm", "causal_conv1d"):
        if importlib.util.find_spec(kernel_pkg) is not None:
            raise SystemExit(f"{kernel_pkg} is installed: transformers would use its kernels, not the "
                             "pure-PyTorch reference path; run in a venv without it (make hf-fixtures)")

    import torch
    import transformers

    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    known = {fx.name: fx for fx in FIXTURES}
    names = args.only or list(known)
    for name in names:
        if name not in known:
            raise SystemExit(f"--only: unknown fixture {name!r}; known: {sorted(known)}")
    versions = _versions()
    date = datetime.date.today().isoformat()

    target = Path(tempfile.mkdtemp(prefix="hf_fixtures_")) if args.check else args.out
    target.mkdir(parents=True, exist_ok=True)
    rows = [build(known[name], target, versions, date) for name in names]
    for row in rows:
        print(f"{row['name']:20s} {row['bytes'] / 1024:7.1f} KiB  {row['params']:7d} params  "
              f"logit std {row['logits_std']:.2f}  mean max p {row['mean_max_prob']:.2f}  "
              f"greedy margin {row['margin']:.3f}  cache==nocache {row['greedy_eq_nocache']}  "
              f"input seed {row['input_seed']}")
    total = sum(row["bytes"] for row in rows)
    print(f"total {total / 1024:.1f} KiB in {len(rows)} fixtures; versions {versions}")
    if args.check:
        problems = []
        for name in names:
            problems += [f"{name}/{p}" for p in _compare(args.out / name, target / name)]
        shutil.rmtree(target)
        if problems:
            print("NOT deterministic / differs from committed fixtures:\n  " + "\n  ".join(problems))
            return 1
        print(f"check: {len(names)} fixtures regenerate bit-identically")
    return 0


if __name__ == "__main__":
    sys.exit(main())
