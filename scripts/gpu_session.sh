#!/usr/bin/env bash
# One GPU session for issue 4 (Triton backend), in under 9 minutes: device tests, tuning of the
# launch table on the device, then the full benchmark with the tuned table. Run it with the `run`
# tool, exactly:
#
#     run(command="bash scripts/gpu_session.sh", carry=[".whl"], timeout_s=590)
#
# (kind left out: an H100 or an H200 both do; the files say which it was.) The script stops itself
# at SESSION_SECONDS (530 s) after it starts: every stage runs under `timeout`, sized from the time
# left, so the call ends before the tool's 590 s even when a stage overruns.
#
#   stage 1  bash scripts/gpu_tests.sh                       <= 210 s  pytest on cuda (norm + RNN kernels) + large shapes
#   stage 2  layernorm bench --tune --install                <= 150 s  (stops starting new groups at
#            its --budget-s = stage time - 20 s; widths 1024 and 8192 first)
#   stage 3  bash scripts/gpu_bench.sh --dtype bfloat16,float32   the rest, <= 330 s (bf16 first: the
#            earlier partial H200 run measured fp32 only), with
#            LAYERNORM_TRITON_TABLE=$OUT/triton-table-<device>.json when stage 2 wrote it
#   stage 4  layernorm bench --rnn --device cuda --gpu-case   only if >= 45 s are left (without
#            --gpu-case where the RNN bench lacks it: --quick below 150 s)
#
# Files that come back in $OUT (7 at most; the tool returns at most 8), written as the stages run so
# a kill keeps what was done:
#   session.log                     everything every stage printed (tee'd line by line)
#   triton-table-<device>.json      the tuned table: commit it as
#                                   src/layernorm/backends/triton_tables/<device>.json to make it the
#                                   default on that GPU (stage 2 already writes that file on the device)
#   triton-tune-<device>.json       every candidate's time and correctness check, per group
#   norm-cuda-<tag>.json            the benchmark, rewritten after every case ("partial": true if cut)
#   norm-cuda-<tag>.csv, .png       written when the benchmark finishes
#   rnn-cuda*.json                  stage 4, when it ran
# Without $OUT (a local run) everything goes to benchmarks/results and /tmp/gpu_session.log.
set -u
cd "$(dirname "$0")/.."
T0=$(date +%s)
DEADLINE=$((T0 + ${SESSION_SECONDS:-530}))
PY=${PYTHON:-python3}
RES=${OUT:-benchmarks/results}
mkdir -p "$RES"
LOG=${OUT:+$OUT/session.log}
LOG=${LOG:-/tmp/gpu_session.log}
: > "$LOG"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=1   # as scripts/gpu_tests.sh: triton 3.9 warns when unset
export COLUMNS=${COLUMNS:-160}      # rich tables in the log, not wrapped at 80 columns
unset TRITON_INTERPRET LAYERNORM_TRITON_TABLE

left() { echo $((DEADLINE - $(date +%s))); }
# cap WANT RESERVE: WANT seconds, or less so that RESERVE seconds stay for the later stages
cap() { local l=$(( $(left) - $2 )); if [ "$l" -lt "$1" ]; then echo "$l"; else echo "$1"; fi; }
say() { echo "$*" | tee -a "$LOG"; }
stage() {  # stage NAME SECONDS CMD...: run CMD under timeout, output tee'd into the log
  local name=$1 secs=$2; shift 2
  if [ "$secs" -lt 20 ]; then say "== $name: SKIPPED ($secs s left for it)"; return 0; fi
  say "== $name (limit ${secs} s, $(( $(date +%s) - T0 )) s into the session)"
  local s0=$(date +%s)
  timeout -k 10 "$secs" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "== $name: exit code $rc ($(( $(date +%s) - s0 )) s; 124 = its time limit)"
  return 0
}

say "== gpu_session.sh: $(date -u +%FT%TZ), deadline in $(left) s; results in $RES"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"

# --- 1. correctness on the device ---------------------------------------------------------------
stage "stage 1: scripts/gpu_tests.sh" "$(cap 210 300)" bash scripts/gpu_tests.sh

# --- 2. tune the launch table ---------------------------------------------------------------------
T2=$(cap 150 180)
stage "stage 2: layernorm bench --tune" "$T2" \
  $PY -m layernorm.cli bench --tune --device cuda --out "$RES" --install --budget-s $((T2 > 40 ? T2 - 20 : 20))
# the table stage 2 wrote in this session (not an older one lying in $RES)
TABLE=$(find "$RES" -maxdepth 1 -name 'triton-table-*.json' -newermt "@$T0" 2>/dev/null | head -1)

# --- 3. the benchmark with the tuned table --------------------------------------------------------
if [ -n "$TABLE" ] && $PY -c "import json, sys; json.load(open(sys.argv[1]))" "$TABLE" 2>>"$LOG"; then
  export LAYERNORM_TRITON_TABLE="$PWD/$TABLE"
  [ "${TABLE#/}" != "$TABLE" ] && export LAYERNORM_TRITON_TABLE="$TABLE"
  say "== stage 3 uses LAYERNORM_TRITON_TABLE=$LAYERNORM_TRITON_TABLE"
else
  say "== stage 3 uses the built-in launch table (no tuned table from stage 2)"
fi
T3=$(cap 330 25)
# gpu_bench.sh stops the bench itself at TIME_LIMIT (SIGTERM, SIGKILL 15 s later); its own copy to
# $OUT is switched off (OUT=) and --out sends the checkpointed JSON straight to $RES instead.
TIME_LIMIT=$((T3 > 40 ? T3 - 20 : 20)) OUT= \
  stage "stage 3: scripts/gpu_bench.sh" "$T3" bash scripts/gpu_bench.sh --out "$RES" --dtype bfloat16,float32

# --- 4. RNN benchmark on cuda, if time is left ----------------------------------------------------
RNN_HELP=$($PY -m layernorm.cli bench --rnn --help 2>/dev/null)
if echo "$RNN_HELP" | grep -q -- "--device"; then
  T4=$(cap 240 5)
  # --gpu-case (the one GPU shape, where the RNN bench has it), else --quick when short of time
  SHAPE=""
  if echo "$RNN_HELP" | grep -q -- "--gpu-case"; then SHAPE="--gpu-case"; elif [ "$T4" -lt 150 ]; then SHAPE="--quick"; fi
  if [ "$T4" -ge 45 ]; then
    stage "stage 4: layernorm bench --rnn --device cuda $SHAPE" "$T4" \
      $PY -m layernorm.cli bench --rnn --device cuda $SHAPE --out "$RES"
  else
    say "== stage 4: SKIPPED (only $T4 s left)"
  fi
else
  say "== stage 4: SKIPPED (layernorm bench --rnn takes no --device here)"
fi

rm -f "$RES"/*.tmp
say "== gpu_session.sh done in $(( $(date +%s) - T0 )) s; files in $RES:"
ls -la "$RES" 2>&1 | tee -a "$LOG"
say "== tuned table summary:"
grep -E '^\[[0-9]+/[0-9]+\]|^  -> |^stopping|^wrote .*triton' "$LOG" | tail -60
exit 0
