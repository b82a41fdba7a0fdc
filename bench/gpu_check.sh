#!/usr/bin/env bash
# Every GPU check of the CUDA path in one run, one log: the CUDA tests, Lightning-vs-plain throughput of PR #1394,
# PR #1321 and PR #1855 (packed rows) at full size, PR #1855's step anatomy (ms/step with each speed-parity switch
# off in turn, beside the record's logged ms/step), host syncs, evaluation speed, and a 3-minute `pgolf fit` of
# PR #1394 through its loop switch and export (step times before/after the switch, recompiles, export time against
# the GPTQ reserve).
#
#   bash bench/gpu_check.sh                  # on the GPU machine (one H100/H200), ~8 minutes
#   bash bench/gpu_check.sh --device cpu     # smoke mode: tiny configs, a few steps, so the GPU run cannot fail on a typo
#
# On the lent machine: carry .gpu (bash ../shared/gpu/prepare.sh) and run `. .gpu/env.sh && bash bench/gpu_check.sh`.
# The data is the embedded corpus built at the record vocabulary (no FineWeb there). Logs go to $OUT (or
# ./gpu_check_out): gpu_check.log, plus each step's own log; every step has its own timeout, and a failing step
# does not stop the others (its exit status is in the log).
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE="$2"; shift 2 ;;
        *) echo "usage: bash bench/gpu_check.sh [--device cuda|cpu]" >&2; exit 2 ;;
    esac
done
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
: > "$LOG"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

step() {  # step NAME TIMEOUT_S COMMAND...: run, log, and record the exit status
    local name="$1" limit="$2"
    shift 2
    echo "=== $name (limit ${limit}s) $(date +%T)" | tee -a "$LOG"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    cat "$OUT/$name.log" >> "$LOG"
    echo "=== $name rc=$rc $(date +%T)" | tee -a "$LOG"
}

if [ "$DEVICE" = cuda ]; then
    R1394=configs/records/pr1394_sp8192_loop45.yaml
    R1321=configs/records/pr1321_slot48.yaml
    R1855=configs/records/pr1855_sp8192_lqer_sparsegate.yaml
    DATA1855=(--data.data_dir data/gpu/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved
              --data.build_embedded true --data.val_max_tokens 1048576)
    ANATOMY=(--steps 20 --warmup 5 --rounds 1)
    DATA8192=(--data.data_dir data/gpu/datasets/fineweb10B_sp8192 --data.build_embedded true --data.val_max_tokens 1048576)
    DATA1024=(--data.data_dir data/gpu/datasets/fineweb10B_sp1024 --data.build_embedded true --data.val_max_tokens 1048576)
    TP=(--steps 20 --warmup 10 --rounds 3)
    FIT=(--trainer.max_time 00:00:03:00 --model.train_log_every 100 --trainer.val_check_interval 100000)
    EVAL_TOKENS=1048576
else
    R1394=configs/records/pr1394_sp8192_loop45_tiny.yaml
    R1321=configs/records/pr1321_slot48_tiny.yaml
    R1855=configs/records/pr1855_sp8192_lqer_sparsegate_tiny.yaml
    DATA1855=()
    ANATOMY=(--steps 2 --warmup 1 --rounds 1)
    DATA8192=()
    DATA1024=()
    TP=(--steps 2 --warmup 1 --rounds 1)
    FIT=(--trainer.max_steps 8 --trainer.val_check_interval 4 --data.val_max_tokens 2048)
    EVAL_TOKENS=4096
fi

step environment 120 "$PY" - <<'EOF'
import importlib.util, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", torch.cuda.get_device_name(0), f"{p.total_memory / 2**30:.0f} GiB", f"sm_{p.major}{p.minor}")
print("flash_attn_interface (FA3):", importlib.util.find_spec("flash_attn_interface") is not None)
print("triton:", importlib.util.find_spec("triton") is not None)
EOF
step cuda_tests 300 "$PY" -m pytest -q -n0 -p no:cacheprovider tests/train/test_cuda.py tests/train/test_compile.py
step throughput_pr1394 360 "$PY" bench/throughput.py --config "$R1394" --device "$DEVICE" "${TP[@]}" -- "${DATA8192[@]}"
step throughput_pr1321 300 "$PY" bench/throughput.py --config "$R1321" --device "$DEVICE" "${TP[@]}" -- "${DATA1024[@]}"
step throughput_pr1855 360 "$PY" bench/throughput.py --config "$R1855" --device "$DEVICE" "${TP[@]}" -- "${DATA1855[@]}"
step step_anatomy_pr1855 480 "$PY" bench/step_anatomy.py --config "$R1855" --device "$DEVICE" "${ANATOMY[@]}" \
    -- "${DATA1855[@]}"
step host_syncs 240 "$PY" bench/host_syncs.py --config "$R1394" --device "$DEVICE" -- "${DATA8192[@]}"
step eval_speed 300 "$PY" bench/eval_speed.py --config "$R1394" --device "$DEVICE" --methods standard sliding \
    --val-tokens "$EVAL_TOKENS" -- "${DATA8192[@]}"
TORCH_LOGS=recompiles step fit_pr1394 420 "$PY" -m pgolf_lit.cli fit --config "$R1394" "${FIT[@]}" "${DATA8192[@]}" \
    --trainer.enable_progress_bar false --trainer.logger.init_args.save_dir "$OUT/runs"

echo "=== summary" | tee -a "$LOG"
grep -E "^=== .* rc=|^throughput |^eval method=|recurrence:activated|stopping_early|gptq:hessians|Recompiling|recompil" \
    "$LOG" | tee "$OUT/summary.txt"
sed -n '/^step anatomy$/,/^step_anatomy /p' "$OUT/step_anatomy_pr1855.log" | tee -a "$OUT/summary.txt"
