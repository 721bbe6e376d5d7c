#!/usr/bin/env bash
# One command that checks and measures generation on a GPU machine, from the repository root:
#
#     bash benchmarks/gpu.sh                 # CUDA: GPU tests, then `base` and `large` (about 5 minutes)
#     bash benchmarks/gpu.sh --device cpu    # the same steps at tiny sizes on a CPU (the script's own test)
#
# Needs torch (CUDA build), numpy, pillow, safetensors, tokenizers, fsspec; no Ray, no network. pytest is
# used when installed, else tests/test_gpu.py runs as a plain script. Steps:
#   1. the GPU tests (pytest -m gpu tests/test_gpu.py): graph replay equals eager token for token, one
#      replay per step without host synchronisation, images equal across micro-batch counts, bf16 within
#      the stated tolerance of fp32;
#   2. benchmarks/generate.py for each preset (random weights): end-to-end, GPT-only, VQGAN-only and
#      encode-only img/s, fraction of the bf16 peak, host calls per step, the old engine in the same run,
#      and a micro-batch sweep (its best end-to-end rate is the measured default micro-batch).
# Writes generate-<preset>.json, tests.txt and summary.json under $OUT (benchmarks/results/ when OUT is
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

if [ "$DEVICE" = cuda ]; then
  PRESETS="base large"
  declare -A MICRO=([base]=256 [large]=256) SWEEP=([base]=64,128,512 [large]=128,512) LIMIT=([base]=170 [large]=170)
  EXTRA="--repeats 2"
  TEST_LIMIT=100
else
  PRESETS="tiny"
  declare -A MICRO=([tiny]=2) SWEEP=([tiny]=1) LIMIT=([tiny]=150)
  EXTRA="--repeats 1 --rows 2 --skip-old --threads 1"
  TEST_LIMIT=120
fi

# 1. the GPU tests
if "$PY" -c "import pytest" 2>/dev/null; then
  timeout "$TEST_LIMIT" "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py > "$OUT_DIR/tests.txt" 2>&1
else
  timeout "$TEST_LIMIT" "$PY" tests/test_gpu.py > "$OUT_DIR/tests.txt" 2>&1
fi
TESTS_RC=$?
tail -n 3 "$OUT_DIR/tests.txt"

# 2. the benchmarks
declare -A RC
for preset in $PRESETS; do
  # shellcheck disable=SC2086
  timeout "${LIMIT[$preset]}" "$PY" benchmarks/generate.py --preset "$preset" --device "$DEVICE" \
    --batch-size "${MICRO[$preset]}" --sweep "${SWEEP[$preset]}" --skip-reference $EXTRA \
    --json "$OUT_DIR/generate-$preset.json" > "$OUT_DIR/generate-$preset.log" 2>&1
  RC[$preset]=$?
  echo "generate.py --preset $preset: exit ${RC[$preset]}"
done

# 3. the summary
ELAPSED=$(( $(date +%s) - START ))
RCS=""
for preset in $PRESETS; do RCS="$RCS $preset=${RC[$preset]}"; done
"$PY" - "$OUT_DIR" "$DEVICE" "$TESTS_RC" "$ELAPSED" $RCS <<'EOF'
import json, sys
from pathlib import Path

out, device, tests_rc, elapsed = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
TARGETS = {"base": 1000.0, "large": 600.0}  # end-to-end img/s on one H100/H200 (issue 11)
summary = {"device": device, "seconds": elapsed, "gpu_tests": {"exit_code": tests_rc,
           "tail": (out / "tests.txt").read_text(errors="replace").strip().splitlines()[-3:]}, "presets": {}}
for item in sys.argv[5:]:
    preset, rc = item.split("=")
    path = out / f"generate-{preset}.json"
    entry = {"exit_code": int(rc)}
    if path.exists():
        r = json.loads(path.read_text())
        ours = r["ours"]
        entry |= {"micro_batch": ours["micro_batch"], "end_to_end_images_per_second": ours["images_per_second"],
                  "gpt_only_images_per_second": ours["gpt_only_images_per_second"],
                  "vqgan_only_images_per_second": ours["vqgan_only_images_per_second"],
                  "encode_only_images_per_second": ours["encode_only_images_per_second"],
                  "bound_by": ours["bound_by"], "best_micro_batch": r.get("best_micro_batch"),
                  "host_calls_per_step": r["host_calls_per_step"],
                  "speedup_vs_old_engine": r.get("speedup_vs_old_engine")}
        if "gpu" in r:
            summary["device_name"] = r["gpu"]["device_name"]
            entry["fraction_of_bf16_peak"] = r["gpu"]["end_to_end_fraction_of_peak"]
            best = max([ours] + r.get("sweep", []), key=lambda s: s["images_per_second"])
            entry["best_end_to_end_images_per_second"] = best["images_per_second"]
            if preset in TARGETS:
                entry["target_images_per_second"] = TARGETS[preset]
                entry["meets_target"] = best["images_per_second"] >= TARGETS[preset]
    else:
        log = out / f"generate-{preset}.log"
        entry["log_tail"] = log.read_text(errors="replace").strip().splitlines()[-5:] if log.exists() else []
    summary["presets"][preset] = entry
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
for preset in $PRESETS; do [ "${RC[$preset]}" -ne 0 ] && FAILED=1; done
exit $FAILED
