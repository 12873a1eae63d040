#!/usr/bin/env bash
# The GPU check: CUDA tests, every loss timed on the GPU (eager, compiled, AMP), the bank scoring, and
# one CIFAR-shaped training epoch (resnet32x4 -> resnet8x4) eager vs compiled, float32 vs AMP.
#
#   benchmarks/gpu_check.sh OUT_DIR            # from anywhere; sized for 15 minutes of one GPU
#   DRY_RUN=cpu benchmarks/gpu_check.sh OUT    # the CPU fallback: every step, small, on the CPU
#
# Without a CUDA device the script runs its CPU fallback (the same steps on small sizes, to check
# that every step works); its numbers say nothing about a GPU and gpu_results.md says so in its title.
# Needs relkd's dependencies in $PYTHON (default: .venv/bin/python if it exists, else python3).
# Writes into OUT_DIR:
#   summary.txt              one line per step: exit status, seconds, limit
#   <step>.log               the full output of each step
#   losses_*.md/json, banks.md/json, train_epoch.md/json
#   gpu_results.md           every table, dated, with the device and the commit, for benchmarks/README.md
# Each step has its own time limit (they add up to 9.5 minutes on the GPU); a failed or timed-out
# step is recorded and the next one runs. The exit status is 0 only if every step passed.
set -uo pipefail

out="$(realpath -m "${1:?usage: benchmarks/gpu_check.sh OUT_DIR}")"
cd "$(dirname "$0")/.."
mkdir -p "$out"
python="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONWARNINGS="ignore::FutureWarning"
status=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name: $*"
    timeout --kill-after=10 "$limit" "$@" >"$out/$name.log" 2>&1
    rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/summary.txt"
    tail -n 3 "$out/$name.log"
    [ "$rc" -eq 0 ] || status=1
}

: >"$out/summary.txt"
if [ "${DRY_RUN:-}" != cpu ] && "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    device=cuda
    nvidia-smi >"$out/nvidia-smi.txt" 2>&1
    export RELKD_TEST_DEVICE=cuda
    sizes=(--batches 64 256 1024 --dims 128 2048)
    compile_sizes=(--batches 1024 --dims 128 2048)
    amp_sizes=(--batches 256 1024 --dims 128 2048)
    rounds=(--rounds 3 --calls 3)
    epoch=()
    limits=(60 90 150 35 20 210)
else
    device=cpu
    echo "no CUDA device (or DRY_RUN=cpu): the CPU fallback, a dry run of every step" | tee -a "$out/summary.txt"
    sizes=(--batches 64 --dims 128)
    compile_sizes=(--batches 64 --dims 128)
    amp_sizes=(--batches 64 --dims 128)
    rounds=(--rounds 2 --calls 1)
    epoch=(--images 128 --batch 32 --negatives 32 --warmup 1)
    limits=(600 900 900 300 300 900)
fi
"$python" -c "import torch; print('torch', torch.__version__, 'device $device')" >>"$out/summary.txt" 2>&1

step tests "${limits[0]}" "$python" -m pytest -q -p no:cacheprovider -m "not slow" \
    tests/test_cuda.py tests/test_perf_contracts.py tests/test_losses_core.py
step bench_eager "${limits[1]}" "$python" -m benchmarks.losses --device "$device" "${sizes[@]}" "${rounds[@]}" \
    --max-reference-gib 16 --out "$out" --tag _eager
step bench_compile "${limits[2]}" "$python" -m benchmarks.losses --device "$device" --compile \
    --losses rkd_distance rkd_angle sp cc pkt crd "${compile_sizes[@]}" "${rounds[@]}" --out "$out" --tag _compile
step bench_amp "${limits[3]}" "$python" -m benchmarks.losses --device "$device" --amp "${amp_sizes[@]}" \
    "${rounds[@]}" --losses rkd_distance rkd_angle sp cc pkt crd hkd kd_svd --out "$out" --tag _amp
step bench_banks "${limits[4]}" "$python" -m benchmarks.banks --device "$device" --out "$out"
step train_epoch "${limits[5]}" "$python" -m benchmarks.train_epoch --device "$device" "${epoch[@]}" --out "$out"

{
    if [ "$device" = cuda ]; then
        echo "### GPU: $("$python" -c 'import torch; print(torch.cuda.get_device_name())'), $(date -u +%Y-%m-%d)"
    else
        echo "### CPU fallback (dry run, not GPU numbers), $(date -u +%Y-%m-%d)"
    fi
    echo
    echo '```'
    cat "$out/summary.txt"
    echo '```'
    for tag in eager compile amp; do
        [ -f "$out/losses_$tag.md" ] && { echo; echo "#### losses, $tag"; echo; cat "$out/losses_$tag.md"; }
    done
    [ -f "$out/banks.md" ] && { echo; echo "#### CRD and HKD scoring"; echo; cat "$out/banks.md"; }
    [ -f "$out/train_epoch.md" ] && { echo; echo "#### one training epoch"; echo; cat "$out/train_epoch.md"; }
} >"$out/gpu_results.md"
echo "results: $out/gpu_results.md (exit $status)"
exit "$status"
