"""``archlab aot``: deviceless compile of the real train and decode steps for TPU slices
and GPU nodes, with memory per device, collectives and a roofline estimate.

* :mod:`experiments.aot.targets`: the chip table (published peak FLOP/s, HBM,
  interconnect; sources cited there), target parsing (``tpu:v5p-64``,
  ``gpu:2x8xh100``) and compile-only devices (libtpu topologies; the CUDA plugin
  with an XLA GPU target config).
* :mod:`experiments.aot.compile`: the train step ``archlab run`` jits and a decode
  step, lowered with sharded ``ShapeDtypeStruct`` arguments and compiled.
* :mod:`experiments.aot.hlo`: collectives in the optimized HLO, loop trip counts
  applied.
* :mod:`experiments.aot.estimate`: analytic model FLOPs and the roofline.
* :mod:`experiments.aot.runner`: configs/presets -> rows -> Markdown + JSON.

Needs the ``aot`` extra (``jax[tpu]`` and ``jax[cuda13]``; ``make aot-venv``).
Verified here: compiles on a CPU-only machine for the targets in BENCHMARKS.md
("Deviceless compile"); no executable was run on a TPU or GPU.
"""
