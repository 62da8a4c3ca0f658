"""The pairs of ``archlab bench vs-torch`` (experiments/bench/vs_torch.py): which models,
which variants on each side, and one timed call of each.

Both sides run the same weights: the HuggingFace model is built in torch from a seeded
random init (HF's own ``_init_weights``), saved with ``save_pretrained`` and read into
archlab with ``archs.from_hf``; archlab variants then only change implementation switches
(``attn_impl``, ``dispatch``, ``scan_chunk``, ``chunk``), never parameters. torch and
transformers are imported inside the functions that use them, so this module (and its
pure-JAX half, :func:`lab_call`) imports without them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench.common import compile_fn
from layers.ffn import llama_hidden

VOCAB = 1024                 # V for every pair
D_MODEL = 256
N_LAYERS = 4
EQ_SHAPE = (2, 64)           # [B, T] of the short input whose forward logits are compared
PROMPT = 1024                # decode / prefill prompt length (B = 1)
DECODE_NEW = (16, 144)       # ms/token = (time(generate 144) - time(generate 16)) / 128
SEED = 0
ROPE = {"rope_type": "default", "rope_theta": 500000.0}

# HF model type and config of each family; transformers defaults for everything else.
_LLAMA = dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
              num_attention_heads=8, num_key_value_heads=2,
              intermediate_size=llama_hidden(D_MODEL, 16), max_position_embeddings=8192,
              rms_norm_eps=1e-5, tie_word_embeddings=False, rope_parameters=ROPE,
              pad_token_id=0)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", _LLAMA),
    "mixtral": ("mixtral", {**_LLAMA, "intermediate_size": 512, "num_local_experts": 8,
                            "num_experts_per_tok": 2, "router_jitter_noise": 0.0,
                            "sliding_window": None}),
    "mamba": ("mamba", dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
                            state_size=16, expand=2, conv_kernel=4, time_step_rank="auto",
                            use_bias=False, use_conv_bias=True, layer_norm_epsilon=1e-5,
                            tie_word_embeddings=True, use_mambapy=False, pad_token_id=0)),
    # n_groups 1: archlab's mamba2 preset (HF's default 8 is Codestral's); chunk_size 256: HF's
    "mamba2": ("mamba2", dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
                              num_heads=2 * D_MODEL // 64, head_dim=64, state_size=64, n_groups=1,
                              expand=2, conv_kernel=4, chunk_size=256, use_bias=False,
                              use_conv_bias=True, layer_norm_epsilon=1e-5, pad_token_id=0)),
}

MODELS = {   # what FAMILIES builds, for the report
    "llama": (f"D{D_MODEL} L{N_LAYERS} H8 K2 (GQA) F{_LLAMA['intermediate_size']}, "
              "RoPE theta 5e5, untied head"),
    "mixtral": f"D{D_MODEL} L{N_LAYERS} H8 K2, 8 experts top-2 F512, RoPE theta 5e5, untied head",
    "mamba": f"D{D_MODEL} L{N_LAYERS} N16 expand 2, tied head",
    "mamba2": f"D{D_MODEL} L{N_LAYERS} head_dim 64 N64 n_groups 1 expand 2 chunk_size 256, untied head",
}

# variant name -> archlab overrides (archs.override) / HF from_pretrained kwargs (+ "runner")
LLAMA_LAB = {"dense": {"attn_impl": "dense"}, "blockwise": {"attn_impl": "blockwise"}}
LLAMA_TORCH = {"eager": {"attn_implementation": "eager"}, "sdpa": {"attn_implementation": "sdpa"}}
MOE_LAB = {"dropless": {"dispatch": "dropless"}, "capacity": {"dispatch": "capacity"},
           "dense": {"dispatch": "dense"}}
MOE_TORCH = {"eager": {"attn_implementation": "eager", "experts_implementation": "eager"},
             "sdpa+grouped_mm": {"attn_implementation": "sdpa",
                                 "experts_implementation": "grouped_mm"}}
MAMBA_LAB = {"assoc_c128": {"scan_chunk": 128}, "assoc_full": {"scan_chunk": 0}}
MAMBA_LAB_ALL = {"sequential": {"scan_impl": "sequential"}}
MAMBA_TORCH = {"mambapy": {"use_mambapy": True}}
MAMBA_TORCH_ALL = {"sequential": {"use_mambapy": False}}
MAMBA2_LAB = {"chunked_c64": {"chunk": 64}, "chunked_c256": {"chunk": 256}}
MAMBA2_TORCH = {"torch_forward": {}}
DECODE_LAB = {"generate": {}}
DECODE_TORCH = {"loop": {"attn_implementation": "sdpa", "runner": "loop"},
                "generate": {"attn_implementation": "sdpa", "runner": "generate"}}
SSM_DECODE_TORCH = {"loop": {"runner": "loop"}, "generate": {"runner": "generate"}}


@dataclasses.dataclass(frozen=True)
class Pair:
    """One row: a family at one shape and mode, archlab variants against torch variants.

    ``mode``: ``train`` (forward + backward of the next-token loss), ``fwd`` (logits, no
    grad), ``prefill`` (a B=1 prompt into a fresh cache) or ``decode`` (ms per token).
    ``*_all``: variants timed only with ``--all-variants``. ``partners``: like-for-like
    (archlab, torch) variant pairs for the second ratio column.
    """
    name: str
    family: str
    mode: str
    batch: int
    seq: int
    lab: dict
    torch: dict
    lab_all: dict = dataclasses.field(default_factory=dict)
    torch_all: dict = dataclasses.field(default_factory=dict)
    partners: tuple = ()

    @property
    def shape(self) -> str:
        if self.mode == "decode":
            return f"decode B{self.batch}, prompt {self.seq}"
        if self.mode == "prefill":
            return f"prefill B{self.batch}×T{self.seq}"
        return f"{self.mode} B{self.batch}×T{self.seq}"

    def variants(self, all_variants: bool) -> tuple[dict, dict]:
        if all_variants:
            return {**self.lab, **self.lab_all}, {**self.torch, **self.torch_all}
        return dict(self.lab), dict(self.torch)


def _llama(name, mode, b, t, long=False):
    like = (("dense", "eager"), ("blockwise", "sdpa"))
    if long:   # dense / eager materialize [H, T, T] scores: opt-in at T = 8192
        return Pair(name, "llama", mode, b, t, {"blockwise": LLAMA_LAB["blockwise"]},
                    {"sdpa": LLAMA_TORCH["sdpa"]}, {"dense": LLAMA_LAB["dense"]},
                    {"eager": LLAMA_TORCH["eager"]}, like)
    return Pair(name, "llama", mode, b, t, LLAMA_LAB, LLAMA_TORCH, partners=like)


def _ssm(name, family, mode, b, t):
    if family == "mamba":
        return Pair(name, "mamba", mode, b, t, MAMBA_LAB, MAMBA_TORCH, MAMBA_LAB_ALL,
                    MAMBA_TORCH_ALL, (("assoc_full", "mambapy"), ("sequential", "sequential")))
    return Pair(name, "mamba2", mode, b, t, MAMBA2_LAB, MAMBA2_TORCH,
                partners=(("chunked_c256", "torch_forward"),))


_MOE_LIKE = (("dropless", "sdpa+grouped_mm"),)
PAIRS: dict[str, Pair] = {p.name: p for p in [
    _llama("llama_train_b4t512", "train", 4, 512),
    _llama("llama_train_b1t2048", "train", 1, 2048),
    _llama("llama_fwd_b1t2048", "fwd", 1, 2048),
    _llama("llama_train_b1t8192", "train", 1, 8192, long=True),
    _llama("llama_fwd_b1t8192", "fwd", 1, 8192, long=True),
    Pair("mixtral_train_b4t512", "mixtral", "train", 4, 512, MOE_LAB, MOE_TORCH, partners=_MOE_LIKE),
    Pair("mixtral_fwd_b4t512", "mixtral", "fwd", 4, 512, MOE_LAB, MOE_TORCH, partners=_MOE_LIKE),
    _ssm("mamba_train_b2t1024", "mamba", "train", 2, 1024),
    _ssm("mamba2_train_b2t1024", "mamba2", "train", 2, 1024),
    _ssm("mamba2_fwd_b2t1024", "mamba2", "fwd", 2, 1024),
    _ssm("mamba_train_b1t8192", "mamba", "train", 1, 8192),
    _ssm("mamba2_train_b1t8192", "mamba2", "train", 1, 8192),
    Pair("llama_decode_1024", "llama", "decode", 1, PROMPT, DECODE_LAB, DECODE_TORCH,
         partners=(("generate", "generate"),)),
    Pair("llama_prefill_1024", "llama", "prefill", 1, PROMPT, LLAMA_LAB, LLAMA_TORCH,
         partners=(("dense", "eager"), ("blockwise", "sdpa"))),
    Pair("mamba2_decode", "mamba2", "decode", 1, PROMPT, DECODE_LAB, SSM_DECODE_TORCH,
         partners=(("generate", "generate"),)),
]}


def tokens_for(batch: int, seq: int, seed: int = SEED) -> np.ndarray:
    """The input of a pair, [B, T] int32 in [0, V), identical on both sides."""
    return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq)).astype(np.int32)


def timed(fn: Callable[[], Any]) -> Callable[[], float]:
    """A measure: ``fn`` run once, returning its wall seconds."""
    def measure() -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    return measure


# ----------------------------------------------------------------------------- archlab side

def next_token_loss(logits, tokens):
    """Mean cross-entropy of logits[:, :-1] against tokens[:, 1:] (fp32)."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


def lab_call(mode: str, model, variables: dict, tokens: np.ndarray) -> tuple[Callable[[], float], Any]:
    """Compiles (outside the timing) one archlab call of ``mode`` and runs it once.

    Returns ``(measure, output)``: ``measure()`` runs the call and returns its seconds
    (decode: seconds per token); ``output`` is the first call's loss (train), logits
    (fwd, prefill) or ``DECODE_NEW[0]`` greedy tokens (decode), for the equality lines.
    """
    import archs
    x = jnp.asarray(tokens, jnp.int32)
    if mode == "decode":
        gen = lambda n: jax.block_until_ready(archs.generate(model, variables, x, n))
        first = gen(DECODE_NEW[0])            # compiles both lengths (warm-up)
        gen(DECODE_NEW[1])
        return _difference(gen), np.asarray(first)[:, x.shape[1]:]
    if mode == "train":
        def loss(params, x):
            logits, _ = model.apply({**variables, "params": params}, x, train=True)
            return next_token_loss(logits, x)
        fn, args = jax.value_and_grad(loss), (variables["params"], x)
    elif mode == "fwd":
        fn, args = (lambda v, x: model.apply(v, x)[0]), (variables, x)
    elif mode == "prefill":   # as archs.generate prefills: a fresh cache of prompt + new tokens
        total = x.shape[1] + DECODE_NEW[1]
        fn = lambda v, x: model.apply(v, x, cache=model.init_cache(x.shape[0], total))
        args = (variables, x)
    else:
        raise ValueError(f"mode={mode!r}; allowed: train, fwd, prefill, decode")
    compiled, _ = compile_fn(fn, *args)
    run = lambda: jax.block_until_ready(compiled(*args))
    out = run()
    out = float(out[0]) if mode == "train" else np.asarray(out if mode == "fwd" else out[0])
    return timed(run), out


def _difference(gen: Callable[[int], Any]) -> Callable[[], float]:
    """Seconds per generated token: two generations from the same prompt, differenced."""
    n1, n2 = DECODE_NEW
    def measure() -> float:
        t0 = time.perf_counter()
        gen(n1)
        t1 = time.perf_counter()
        gen(n2)
        return ((time.perf_counter() - t1) - (t1 - t0)) / (n2 - n1)
    return measure


def dropped_fraction(model, variables: dict, tokens: np.ndarray) -> list[float] | None:
    """Per layer, the MoE ``moe_dropped`` metric (fraction of selected assignments dropped)
    on ``tokens``; None if the model reports none."""
    aux = jax.jit(lambda v, x: model.apply(v, x)[1])(variables, jnp.asarray(tokens))
    vals = [np.asarray(v, np.float64).reshape(-1) for k, v in sorted(aux["metrics"].items())
            if k.startswith("moe_dropped")]
    return [float(f) for f in np.concatenate(vals)] if vals else None


def n_params(tree) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- torch side

def build_reference(family: str, directory: str) -> None:
    """Saves the family's HF model (fp32, seeded random init) to ``directory``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    model_type, kwargs = FAMILIES[family]
    torch.manual_seed(SEED)
    config = AutoConfig.for_model(model_type, **kwargs)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)


def load_torch(directory: str, spec: dict):
    """The saved HF model loaded with ``spec``'s from_pretrained kwargs (fp32)."""
    import torch
    from transformers import AutoModelForCausalLM
    kwargs = {k: v for k, v in spec.items() if k != "runner"}
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, **kwargs)


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch
    model.eval()
    with torch.inference_mode():
        return model(torch.from_numpy(tokens.astype(np.int64)), use_cache=False).logits.numpy()


def torch_call(mode: str, model, tokens: np.ndarray, runner: str | None = None
               ) -> tuple[Callable[[], float], Any]:
    """One torch (eager) call of ``mode``, run once as warm-up; same contract as
    :func:`lab_call`. ``train``: grads are set to None before each call (outside its time);
    no optimizer. ``fwd``/``prefill``/``decode`` run under ``torch.inference_mode()``."""
    import torch
    import torch.nn.functional as F
    ids = torch.from_numpy(tokens.astype(np.int64))
    if mode == "train":
        model.train()
        def measure() -> float:
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            logits = model(ids, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            loss.backward()
            measure.loss = float(loss.detach())
            return time.perf_counter() - t0
        measure()
        return measure, measure.loss
    model.eval()
    if mode in ("fwd", "prefill"):
        def run():
            with torch.inference_mode():
                return model(ids, use_cache=mode == "prefill").logits
        return timed(run), run().numpy()
    if mode != "decode":
        raise ValueError(f"mode={mode!r}; allowed: train, fwd, prefill, decode")
    gen = (lambda n: _greedy_loop(model, ids, n)) if runner == "loop" else \
          (lambda n: _hf_generate(model, ids, n))
    first = gen(DECODE_NEW[0])
    gen(DECODE_NEW[1])
    return _difference(gen), first.numpy()


def _greedy_loop(model, prompt, n: int):
    """Greedy decoding by hand: prefill with a fresh cache, then one token per call."""
    import torch
    with torch.inference_mode():
        out = model(prompt, use_cache=True)
        cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
        toks = [tok]
        for _ in range(n - 1):
            out = model(tok, cache=cache, use_cache=True)
            cache, tok = out.cache, out.logits[:, -1:].argmax(-1)
            toks.append(tok)
    return torch.cat(toks, dim=1)


def _hf_generate(model, prompt, n: int):
    import torch
    with torch.inference_mode():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, num_beams=1, use_cache=True,
                             eos_token_id=None, pad_token_id=0)
    return out[:, prompt.shape[1]:]


def kernel_packages() -> list[str]:
    """Installed packages through which transformers could bypass its PyTorch paths."""
    import importlib.util
    return [p for p in ("mamba_ssm", "causal_conv1d", "kernels") if importlib.util.find_spec(p)]
