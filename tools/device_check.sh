#!/usr/bin/env bash
# Device check for a machine with a GPU or TPU (<= 8 minutes):
#   1. the Pallas kernel tests (tests/pallas_kernels) run compiled on the device --
#      values and gradients against the references; any failure OR skip fails;
#   2. `archlab bench kernels` (flash attention vs jax.nn.dot_product_attention xla and
#      cudnn; gmm vs jax.lax.ragged_dot): any row whose error vs the reference exceeds
#      the bf16 tolerance, or a missing kernel row, fails;
#   3. the train-step throughput and MFU of a ~125M Llama (experiments/configs/mfu_125m.py).
# It writes bench_out/device_check.md (the BENCHMARKS.md rows) and, with --write,
# appends them to BENCHMARKS.md. Exit status: 0 only when every step passed.
#
#   tools/device_check.sh [--write] [--skip tests,bench,mfu] [--dry-run] [--python PY]
set -euo pipefail
cd "$(dirname "$0")/.."

PY=.venv/bin/python
WRITE=0
DRY=0
SKIP=""
TOL=${DEVICE_CHECK_TOL:-0.02}  # relative RMS error allowed for bf16 kernel outputs
OUT=bench_out
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
  case "$1" in
    --write) WRITE=1 ;;
    --dry-run) DRY=1 ;;
    --skip) SKIP="$2"; shift ;;
    --python) PY="$2"; shift ;;
    -h|--help) usage; exit 0 ;;
    *) echo "device_check: unknown argument '$1'" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
for s in ${SKIP//,/ }; do
  case "$s" in tests|bench|mfu) ;; *) echo "device_check: --skip takes tests,bench,mfu; got '$s'" >&2; exit 2 ;; esac
done
skipped() { [[ ",$SKIP," == *",$1,"* ]]; }
run() { echo "+ $*"; [ "$DRY" = 1 ] || "$@"; }
fail() { echo "DEVICE CHECK FAILED: $*" >&2; exit 1; }

mkdir -p "$OUT"
REPORT="$OUT/device_check.md"

if [ "$DRY" = 0 ]; then
  BACKEND=$("$PY" -c 'import jax; print(jax.default_backend())')
  case "$BACKEND" in
    gpu|tpu) ;;
    *) fail "no GPU or TPU visible to jax (default backend: $BACKEND); this check needs one" ;;
  esac
  DEVICE=$("$PY" -c 'import jax; d = jax.devices()[0]; print(d.device_kind, "x", jax.device_count())')
  echo "device: $DEVICE"
else
  BACKEND=dry-run
  DEVICE=dry-run
fi
{
  echo "### Device check: $DEVICE ($(date -u +%Y-%m-%d))"
  echo
} > "$REPORT"

# 1. kernel tests, compiled on the device (the dispatchers pick the device kernels)
if ! skipped tests; then
  run timeout 300 "$PY" -m pytest -q -p no:xdist -rs tests/pallas_kernels --junitxml="$OUT/kernel_tests.xml" \
    || fail "kernel tests failed (see above)"
  if [ "$DRY" = 0 ]; then
    "$PY" - "$OUT/kernel_tests.xml" <<'PYEOF' || fail "kernel tests skipped on the device (skips are failures here)"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suites = [root] if root.tag == "testsuite" else list(root)
skips = sum(int(s.get("skipped", 0)) for s in suites)
tests = sum(int(s.get("tests", 0)) for s in suites)
print(f"kernel tests: {tests} run, {skips} skipped")
sys.exit(1 if skips or not tests else 0)
PYEOF
    echo "- kernel tests (tests/pallas_kernels) compiled on $BACKEND: passed, none skipped" >> "$REPORT"
  fi
fi

# 2. kernel benchmarks against the XLA / cuDNN / ragged_dot baselines
if ! skipped bench; then
  run timeout 240 "$PY" -m experiments.cli bench kernels --repeats 5 --out "$OUT" || fail "bench kernels failed"
  if [ "$DRY" = 0 ]; then
    "$PY" - "$OUT/kernels.json" "$TOL" "$BACKEND" >> "$REPORT" <<'PYEOF' || fail "a kernel's error exceeds the tolerance or its row is missing (see $OUT/kernels.json)"
import json, math, sys
data, tol, backend = json.load(open(sys.argv[1])), float(sys.argv[2]), sys.argv[3]
rows, bad = data["rows"], []
for r in rows:
    err = r.get("err")
    if err is not None and not (isinstance(err, (int, float)) and math.isfinite(err) and err <= tol):
        bad.append(f"{r.get('path')} {r.get('shape')}: err={err}")
own = [r for r in rows if str(r.get("path", "")).endswith("-pallas") and r.get("ms") is not None]
if not own:
    bad.append(f"no timed Pallas kernel row on {backend}")
print("\n| path | mode | shape | ms | TFLOP/s | err |\n|---|---|---|---|---|---|")
for r in rows:
    print(f"| {r.get('path')} | {r.get('mode')} | {r.get('shape')} | {r.get('ms')} | {r.get('tflops')} | {r.get('err')} |")
if bad:
    print("FAILED:", *bad, sep="\n  ", file=sys.stderr)
sys.exit(1 if bad else 0)
PYEOF
  fi
fi

# 3. train-step MFU of a ~125M Llama
if ! skipped mfu; then
  run timeout 240 "$PY" -m experiments.cli run experiments/configs/mfu_125m.py --out runs/mfu_125m \
    --overwrite --no-progress || fail "the 125M Llama run failed"
  if [ "$DRY" = 0 ]; then
    "$PY" - runs/mfu_125m >> "$REPORT" <<'PYEOF' || fail "could not compute the MFU"
import json, sys
import jax, jax.numpy as jnp
import archs
from experiments import config as config_lib
from experiments.aot import estimate, targets
cfg = config_lib.load_experiment_file("experiments/configs/mfu_125m.py")[0]
summary = json.load(open(f"{sys.argv[1]}/summary.json"))
boxed = jax.eval_shape(archs.build(cfg.model).init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
total, active = estimate.matmul_params(cfg.model, boxed["params"])
per_token = estimate.train_flops(cfg.model, active, 1, cfg.task.seq_len) / cfg.task.seq_len
kind = jax.devices()[0].device_kind
chip = next((c for c in targets.CHIPS.values() if c.device_kind == kind), None)
if chip is None:
    sys.exit(f"unknown device kind {kind!r}: add it to experiments/aot/targets.py CHIPS")
tok_s = summary["tokens_per_s"]
mfu = tok_s * per_token / (chip.peak_flops / chip.devices_per_chip)
print(f"\n- llama-125m ({total / 1e6:.0f}M params), T={cfg.task.seq_len}, B={cfg.train.batch_size}, "
      f"bf16: {tok_s:,.0f} tokens/s, MFU {mfu:.1%} of {chip.peak_flops / 1e12:.0f} TFLOP/s ({kind})")
PYEOF
  fi
fi

echo "device check passed; rows in $REPORT"
cat "$REPORT"
if [ "$WRITE" = 1 ] && [ "$DRY" = 0 ]; then
  { echo; cat "$REPORT"; } >> BENCHMARKS.md
  echo "appended to BENCHMARKS.md"
fi
