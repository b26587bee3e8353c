#!/usr/bin/env bash
# GPU check: DPO and GRPO steps of a Qwen2.5-0.5B-sized model (random init, no download) in
# bf16, LoRA + gradient checkpointing, GRPO groups sampled with the KV-cache generator, and
# TRL's DPOTrainer and GRPOTrainer on the same rows/prompts.
# Writes benchmarks/results/gpu.json (tokens/s, peak memory, MFU at 989 dense bf16 TFLOP/s,
# rlcourse/TRL ratios, predicted vs measured bf16 memory).
#
#   bash benchmarks/gpu_check.sh            # on a machine with one CUDA GPU, < 10 minutes
#   bash benchmarks/gpu_check.sh --smoke    # tiny model on the CPU: checks the script itself
#   bash benchmarks/gpu_check.sh --dry-run  # print the plan (environment, parts), run nothing
#
# TRL offline: a machine without network installs TRL and datasets from wheels in the ignored
# folder .wheels/ (or $GPU_CHECK_WHEELS), made where there is network, for the GPU machine's
# Python (torch is not among them: the machine has its own):
#   pip download trl datasets --python-version 3.11 --only-binary=:all: -d .wheels
# and carried with the checkout (e.g. the device tool's `carry: [".wheels"]`, 64 MiB at most;
# trl + datasets + pyarrow + pandas are about 60 MB).
#
# Python: $PYTHON (default python3). If it already imports torch, a venv that sees its
# packages (--system-site-packages) is made in $GPU_CHECK_VENV (default .venv-gpu) and torch
# is never reinstalled; rlcourse goes in with `pip install -e .[bench]` (peft, trl, ...).
# Without network the install fails and the check runs from the checkout (PYTHONPATH); a part
# whose package is missing records that in gpu.json, the others still run.
# GPU_CHECK_NO_INSTALL=1: skip the venv and pip install (use $PYTHON as it is).
# Logs of every part: benchmarks/results/gpu_check_logs/ (or $GPU_CHECK_OUT/gpu_check_logs).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
SMOKE=""
DRY=""
case "${1:-}" in
  --smoke) SMOKE="--smoke" ;;
  --dry-run) DRY=1 ;;
  "") ;;
  *) echo "usage: bash benchmarks/gpu_check.sh [--smoke|--dry-run]" >&2; exit 2 ;;
esac
WHEELS="${GPU_CHECK_WHEELS:-$ROOT/.wheels}"
PART_LIMITS=(env:45 dpo:90 dpo_lora:75 grpo:90 trl:90 trl_grpo:120)
OUT_DIR="${GPU_CHECK_OUT:-$ROOT/benchmarks/results}"
NAME="gpu.json"
if [[ -n "$SMOKE" ]]; then NAME="gpu_smoke.json"; fi
LOGS="$OUT_DIR/gpu_check_logs"
if [[ -n "$DRY" ]]; then
  echo "gpu_check --dry-run: python ${PYTHON:-python3}, output $OUT_DIR/$NAME, logs $LOGS"
  if [[ -d "$WHEELS" ]]; then
    echo "wheels: $WHEELS ($(ls "$WHEELS" | wc -l) files) would be installed offline"
  else
    echo "wheels: $WHEELS absent (TRL from the environment or pip)"
  fi
  for p in "${PART_LIMITS[@]}"; do echo "part ${p%%:*}: limit ${p##*:} s"; done
  exit 0
fi
PARTS="$(mktemp -d)"
mkdir -p "$OUT_DIR" "$LOGS"
PY="${PYTHON:-python3}"
VENV="${GPU_CHECK_VENV:-$ROOT/.venv-gpu}"
START=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - START ))s] $*"; }

# 1. Python environment ------------------------------------------------------------------
if "$PY" -c 'import torch' >/dev/null 2>&1; then
  log "torch found in $PY ($("$PY" -c 'import torch; print(torch.__version__)')): reused"
  HAVE_TORCH=1
else
  log "no torch in $PY: pip will install one (a CUDA build, several GB)"
  HAVE_TORCH=0
fi
DEPS='import transformers, accelerate, peft, trl, datasets, yaml, safetensors, tokenizers'
if [[ -z "${GPU_CHECK_NO_INSTALL:-}" ]] && "$PY" -c "$DEPS" >/dev/null 2>&1; then
  log "$PY already has every package: no venv, no install (running from the checkout)"
  GPU_CHECK_NO_INSTALL=1
fi
if [[ -n "${GPU_CHECK_NO_INSTALL:-}" ]]; then
  VENV=""
elif [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv --system-site-packages "$VENV" || { log "venv failed; using $PY"; VENV=""; }
fi
RUN="${VENV:+$VENV/bin/python}"
RUN="${RUN:-$PY}"
if [[ "$HAVE_TORCH" == 1 ]] && ! "$RUN" -c 'import torch' >/dev/null 2>&1; then
  log "the venv does not see torch; using $PY directly"
  RUN="$PY"
fi
# TRL and datasets from carried wheels first (a GPU machine without network).
if [[ -z "${GPU_CHECK_NO_INSTALL:-}" && -d "$WHEELS" ]] \
    && ! "$RUN" -c 'import trl, datasets' >/dev/null 2>&1; then
  if "$RUN" -m pip install --quiet --disable-pip-version-check --no-index \
      --find-links "$WHEELS" trl datasets >"$LOGS/pip_wheels.log" 2>&1; then
    log "trl and datasets installed from $WHEELS"
  else
    log "installing from $WHEELS failed, see $LOGS/pip_wheels.log"
  fi
fi
# Everything but torch; pip sees the preinstalled torch and leaves it alone.
if [[ -n "${GPU_CHECK_NO_INSTALL:-}" ]]; then
  log "GPU_CHECK_NO_INSTALL set: no pip install"
elif timeout 90 "$RUN" -m pip install --quiet --disable-pip-version-check --retries 1 \
    --timeout 20 -e ".[bench]" \
    >"$LOGS/pip.log" 2>&1; then
  log "pip install -e .[bench]: ok"
else
  log "pip install failed (offline?); running from the checkout, see $LOGS/pip.log"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

# 2. The parts, each in its own process with a time limit --------------------------------
run_part() {  # name, seconds
  local name="$1" limit="$2" rc=0
  log "part $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$RUN" benchmarks/gpu_check.py --part "$name" $SMOKE \
    --out "$PARTS/$name.json" >"$LOGS/$name.log" 2>&1 || rc=$?
  if [[ $rc -ne 0 ]]; then
    log "part $name failed or timed out (exit $rc); last lines of its log:"
    tail -n 5 "$LOGS/$name.log" || true
  fi
  return 0
}
for p in "${PART_LIMITS[@]}"; do run_part "${p%%:*}" "${p##*:}"; done

# 3. One file ---------------------------------------------------------------------------
"$RUN" benchmarks/gpu_check.py --merge $SMOKE --parts-dir "$PARTS" --out "$OUT_DIR/$NAME" \
  || log "merge failed"
log "wrote $OUT_DIR/$NAME (logs in $LOGS)"
rm -rf "$PARTS"
