"""Sparse, local and memory attention models: Llama-style pre-norm decoders (RMSNorm,
SwiGLU, RoPE) whose attention is replaced by a sparse mixer from ``layers``.

Presets (sizes ``tiny`` for tests, ``small`` for CPU experiments):

* ``sliding_window``: local attention, ring-buffer decode cache (O(W) decode memory).
* ``longformer``: window + prefix global tokens (Beltagy et al. 2020), causal.
* ``bigbird``: window + globals + random blocks (Zaheer et al. 2020); every layer has
  its own seed (the repeating group is the whole preset depth). Overriding ``n_layers``
  beyond it repeats the group, and with it the random patterns.
* ``sparse_transformer``: strided pattern split across heads (Child et al. 2019).
* ``linformer``: *encoder-style* (bidirectional) length-projected attention
  (Wang et al. 2020); ``causal`` is False, so it cannot decode.
* ``hierarchical``: fine in-group + coarse group-summary attention, causal.
* ``routed_attention``: content-routed top-k block attention (MoBA/NSA-style).
* ``transformer_xl``: segment recurrence with relative positions (Dai et al. 2019).
* ``transnormer``: exact softmax inside blocks + normed linear attention across.
* ``multiscale``: layers cycling local window -> strided global -> full attention.
"""

from __future__ import annotations

from archs.config import BlockSpec, ModelConfig
from layers.attention import AttentionConfig
from layers.ffn import FFNConfig
from layers.hierarchical import HierarchicalConfig
from layers.linformer import LinformerConfig
from layers.routed_attention import RoutedAttentionConfig
from layers.sparse_attention import BigBirdConfig, LongformerConfig, SlidingWindowConfig
from layers.sparse_transformer import SparseTransformerConfig
from layers.transnormer import TransNormerConfig
from layers.xl_attention import TransformerXLConfig

SIZES = {
    #        d_model, layers, heads, kv_heads, ffn multiple_of, vocab, max_len, scale (local spans)
    "tiny": (64, 2, 4, 2, 16, 256, 1024, 1),
    "small": (128, 4, 4, 2, 32, 512, 4096, 2),
}


def _model(name: str, size: str, mixers, n_layers: int | None = None) -> ModelConfig:
    d, layers, _, _, mult_of, vocab, max_len, _ = SIZES[size]
    ffn = FFNConfig(activation="swiglu", multiple_of=mult_of)
    pattern = tuple(BlockSpec(mixer=m, ffn=ffn) for m in mixers)
    n = n_layers or layers
    n = -(-n // len(pattern)) * len(pattern)
    return ModelConfig(name=name, vocab_size=vocab, d_model=d, n_layers=n, pattern=pattern,
                       norm="rmsnorm", norm_eps=1e-5, tie_embeddings=True, max_len=max_len)


def _heads(size):
    _, _, h, kh, *_ = SIZES[size]
    return dict(n_heads=h, n_kv_heads=kh)


def _s(size):
    return SIZES[size][-1]


def sliding_window(size: str = "small") -> ModelConfig:
    return _model("sliding_window", size, [SlidingWindowConfig(window=16 * _s(size), **_heads(size))])


def longformer(size: str = "small") -> ModelConfig:
    s = _s(size)
    mixer = LongformerConfig(window=32 * s, n_global=2 * s, block_q=16 * s, block_k=16 * s, **_heads(size))
    return _model("longformer", size, [mixer])


def bigbird(size: str = "small") -> ModelConfig:
    s = _s(size)
    # one seed per layer: the repeating group is the whole stack, so nn.scan over groups
    # never repeats a random pattern (BigBird draws random blocks per layer)
    mixers = [BigBirdConfig(window=16 * s, n_global=2 * s, n_random=2, seed=seed, block_q=16 * s,
                            block_k=16 * s, **_heads(size)) for seed in range(SIZES[size][1])]
    return _model("bigbird", size, mixers)


def sparse_transformer(size: str = "small") -> ModelConfig:
    s = _s(size)
    mixer = SparseTransformerConfig(pattern="strided", stride=16 * s, n_strided=None, layout="heads",
                                    block_q=16 * s, block_k=16 * s, **_heads(size))
    return _model("sparse_transformer", size, [mixer])


def linformer(size: str = "small") -> ModelConfig:
    mixer = LinformerConfig(causal=False, proj_len=32 * _s(size), max_len=SIZES[size][6],
                            n_heads=SIZES[size][2])
    return _model("linformer", size, [mixer])


def hierarchical(size: str = "small") -> ModelConfig:
    s = _s(size)
    mixer = HierarchicalConfig(group=16 * s, block_q=16 * s, block_k=16 * s, **_heads(size))
    return _model("hierarchical", size, [mixer])


def routed_attention(size: str = "small") -> ModelConfig:
    s = _s(size)
    mixer = RoutedAttentionConfig(top_k=2 * s, block_k=16 * s, **_heads(size))
    return _model("routed_attention", size, [mixer])


def transformer_xl(size: str = "small") -> ModelConfig:
    s = _s(size)
    mixer = TransformerXLConfig(n_heads=SIZES[size][2], mem_len=32 * s, segment_len=32 * s)
    return _model("transformer_xl", size, [mixer])


def transnormer(size: str = "small") -> ModelConfig:
    s = _s(size)
    mixer = TransNormerConfig(block=16 * s, block_q=16 * s, block_k=16 * s, **_heads(size))
    return _model("transnormer", size, [mixer])


def multiscale(size: str = "small") -> ModelConfig:
    s = _s(size)
    mixers = [SlidingWindowConfig(window=32 * s, **_heads(size)),
              SparseTransformerConfig(pattern="strided", stride=16 * s, n_strided=None, layout="b",
                                      **_heads(size)),
              AttentionConfig(**_heads(size))]
    return _model("multiscale", size, mixers, n_layers=3 if size == "tiny" else 6)


PRESETS = {
    "sliding_window": (sliding_window, ("tiny", "small")),
    "longformer": (longformer, ("tiny", "small")),
    "bigbird": (bigbird, ("tiny", "small")),
    "sparse_transformer": (sparse_transformer, ("tiny", "small")),
    "linformer": (linformer, ("tiny", "small")),
    "hierarchical": (hierarchical, ("tiny", "small")),
    "routed_attention": (routed_attention, ("tiny", "small")),
    "transformer_xl": (transformer_xl, ("tiny", "small")),
    "transnormer": (transnormer, ("tiny", "small")),
    "multiscale": (multiscale, ("tiny", "small")),
}
