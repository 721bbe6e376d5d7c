#!/usr/bin/env bash
# One command that checks and measures generation, tokenize's encoder and training on a GPU machine,
# from the repository root:
#
#     bash benchmarks/gpu.sh                 # CUDA: GPU tests, then `base` and `large` (about 5 minutes)
#     bash benchmarks/gpu.sh --device cpu    # the same steps at tiny sizes on a CPU (the script's own test)
#
# Needs torch (CUDA build), numpy, pillow, safetensors and tokenizers only (no fsspec, pyarrow or Ray, no
# network): it checks them first and names, in one line, whatever is missing. pytest is
# used when installed, else tests/test_gpu.py runs as a plain script. Steps:
#   1. the GPU tests (pytest -m gpu tests/test_gpu.py): graph replay equals eager token for token, one
#      replay per step without host synchronisation, images equal across micro-batch counts, bf16 within
#      the stated tolerance of fp32;
#   2. benchmarks/generate.py for base and large (random weights): end-to-end, GPT-only, VQGAN-only and
#      encode-only img/s, fraction of the bf16 peak, host calls per step, the old engine in the same run,
#      and a micro-batch sweep (its best end-to-end rate is the measured default micro-batch); and base
#      once more with the sampler compiled (torch.compile inside the engine's graph), to decide by
#      measurement whether to turn that on. The CPU fallback runs tiny only, without the compiled run;
#   3. benchmarks/gpu_train.py (issue 18): the full f16/16384 VQGAN encoder's img/s for tokenize, and the
#      GPT training step's tokens/s and MFU for base and large at the largest batch that fits.
# Writes generate-<run>.json (and .log), gpu_train.json (and .log), tests.txt and summary.json under $OUT (benchmarks/results/ when OUT is
# unset; on CUDA the summary is also copied there as gpu-<device name>.json). Each step has a time limit
# so the whole run stays under 8 minutes; a step that fails or runs out is recorded and the rest still run.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    *) echo "usage: bash benchmarks/gpu.sh [--device cuda|cpu]" >&2; exit 2 ;;
  esac
done
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
START=$(date +%s)
# Fewer, larger segments: no fragmentation across the benchmarks' differently shaped runs (and OOM retries)
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"

# 0. what the steps import, checked before any of them runs
MISSING=$("$PY" - <<'EOF' 2>&1
import importlib
missing = []
for name in ("torch", "numpy", "PIL", "safetensors", "tokenizers", "painter.inference.generator",
             "painter.training.gpt", "painter.inference.vq_encode", "painter.checkpoint.model_dir"):
    try:
        importlib.import_module(name)
    except ImportError as e:
        missing.append(getattr(e, "name", None) or name)
print(" ".join(sorted(set(missing))))
EOF
)
if [ -n "$MISSING" ]; then
  echo "gpu.sh: cannot import: $MISSING (needs torch, numpy, pillow, safetensors, tokenizers)" >&2
  exit 2
fi

if [ "$DEVICE" = cuda ]; then
  BUDGET=465  # seconds for the whole script (under 8 minutes): each step's limit is cut to what is left
  # name|preset|micro-batch|extra arguments|time limit (s)
  RUNS="base|base|256|--sweep 64,128,512 --repeats 2 --decoder-layouts|110
base-compiled-sampler|base|256|--compile-sampler --skip-old --repeats 2|60
large|large|256|--sweep 128,512 --repeats 2|100"
  TEST_LIMIT=60
  TRAIN_LIMIT=170  # gpu_train.py keeps to --budget-s (10 s less), so it ends inside the limit
else
  BUDGET=900  # tiny sizes take ~15 s of CPU; the limits leave room for a heavily shared machine
  RUNS="tiny|tiny|2|--sweep 1 --repeats 1 --rows 2 --skip-old --threads 1|420"
  TEST_LIMIT=300
  TRAIN_LIMIT=300
fi
left() { local l=$(( BUDGET - ($(date +%s) - START) )); [ "$l" -lt "$1" ] && echo $(( l > 5 ? l : 5 )) || echo "$1"; }

# 1. the GPU tests
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout "$(left $TEST_LIMIT)" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py > "$OUT_DIR/tests.txt" 2>&1
else
  timeout "$(left $TEST_LIMIT)" "$PY" tests/test_gpu.py > "$OUT_DIR/tests.txt" 2>&1
fi
TESTS_RC=$?
tail -n 3 "$OUT_DIR/tests.txt"

# 2. the benchmarks
RCS=""
while IFS='|' read -r name preset micro extra limit; do
  step_s=$(left "$limit")  # generate.py skips sections that would start in its last 10 s
  # shellcheck disable=SC2086
  timeout "$step_s" "$PY" benchmarks/generate.py --preset "$preset" --device "$DEVICE" \
    --micro-batch "$micro" --skip-reference --budget-s $(( step_s > 20 ? step_s - 10 : 10 )) $extra \
    --json "$OUT_DIR/generate-$name.json" > "$OUT_DIR/generate-$name.log" 2>&1 < /dev/null
  rc=$?
  RCS="$RCS $name=$rc"
  echo "generate.py --preset $preset $extra: exit $rc"
done <<< "$RUNS"

# 3. the encoder and training step (gpu_train.py writes gpu_train.json under $OUT_DIR)
TRAIN_S=$(left $TRAIN_LIMIT)
timeout "$TRAIN_S" "$PY" benchmarks/gpu_train.py --device "$DEVICE" --out "$OUT_DIR" --budget-s $(( TRAIN_S > 20 ? TRAIN_S - 10 : 10 )) \
  > "$OUT_DIR/gpu_train.log" 2>&1 < /dev/null
TRAIN_RC=$?
RCS="$RCS gpu_train=$TRAIN_RC"
echo "gpu_train.py: exit $TRAIN_RC"

# 4. the summary
ELAPSED=$(( $(date +%s) - START ))
"$PY" - "$OUT_DIR" "$DEVICE" "$TESTS_RC" "$ELAPSED" $RCS <<'EOF'
import json, sys
from pathlib import Path

out, device, tests_rc, elapsed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
TARGETS = {"base": 1000.0, "large": 600.0}  # end-to-end img/s on one H100/H200 (issue 11)
summary = {"device": device, "seconds": elapsed, "gpu_tests": {"exit_code": tests_rc,
           "tail": (out / "tests.txt").read_text(errors="replace").strip().splitlines()[-3:]}, "runs": {}}
for item in sys.argv[5:]:
    name, rc = item.split("=")
    if name == "gpu_train":
        path = out / "gpu_train.json"
        summary["gpu_train"] = {"exit_code": int(rc), **(json.loads(path.read_text()) if path.exists() else {})}
        continue
    path = out / f"generate-{name}.json"
    entry = {"exit_code": int(rc)}
    if path.exists():  # written after each section: a step that failed or was killed keeps what it finished
        r = json.loads(path.read_text())
        ours = r.get("ours", {})
        entry |= {"complete": r.get("complete", False), "errors": r.get("errors"),
                  "micro_batch": ours.get("micro_batch"), "end_to_end_images_per_second": ours.get("images_per_second"),
                  "gpt_only_images_per_second": ours.get("gpt_only_images_per_second"),
                  "vqgan_only_images_per_second": ours.get("vqgan_only_images_per_second"),
                  "encode_only_images_per_second": ours.get("encode_only_images_per_second"),
                  "bound_by": ours.get("bound_by"), "best_micro_batch": r.get("best_micro_batch"),
                  "host_calls_per_step": r.get("host_calls_per_step"), "kv_cache": r.get("kv_cache"),
                  "speedup_vs_old_engine": r.get("speedup_vs_old_engine"), "compile_sampler": r.get("compile_sampler")}
        if "gpu" in r:
            summary["device_name"] = r["gpu"]["device_name"]
            entry["fraction_of_bf16_peak"] = r["gpu"]["end_to_end_fraction_of_peak"]
        rates = [s["images_per_second"] for s in [ours] + r.get("sweep", []) if "images_per_second" in s]
        if rates and r.get("device") != "cpu":
            entry["best_end_to_end_images_per_second"] = max(rates)
            if r["preset"] in TARGETS:
                entry["target_images_per_second"] = TARGETS[r["preset"]]
                entry["meets_target"] = max(rates) >= TARGETS[r["preset"]]
    else:
        log = out / f"generate-{name}.log"
        entry["log_tail"] = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
    summary["runs"][name] = entry
text = json.dumps(summary, ensure_ascii=False, indent=1)
(out / "summary.json").write_text(text + "\n")
if "device_name" in summary:
    name = "".join(c if c.isalnum() else "-" for c in summary["device_name"]).strip("-").lower()
    results = Path("benchmarks/results")
    results.mkdir(parents=True, exist_ok=True)
    (results / f"gpu-{name}.json").write_text(text + "\n")
print(text)
EOF
SUMMARY_RC=$?
FAILED=$(( TESTS_RC != 0 || SUMMARY_RC != 0 ))
for item in $RCS; do [ "${item#*=}" != 0 ] && FAILED=1; done
exit $FAILED
