#!/usr/bin/env bash
# The GPU check: the test suite on CUDA, then the benchmarks (eager, AMP, torch.compile).
#
#   benchmarks/gpu_check.sh OUT_DIR          # from anywhere; about 5 minutes on one H100 (at most 8.5)
#
# Needs a CUDA build of torch and relkd's dependencies in $PYTHON (default: .venv/bin/python if it
# exists, else python3). Writes into OUT_DIR:
#   summary.txt             one line per step: exit status and seconds
#   tests*.log, bench*.log  the full output of each step
#   losses_*.md/json, banks.md/json
#   gpu_results.md          every table, dated and with the device, ready for benchmarks/README.md
# Each step has its own time limit; a failed or timed-out step is recorded and the next one runs.
# The exit status is 0 only if every step passed.
set -uo pipefail

out="$(realpath -m "${1:?usage: benchmarks/gpu_check.sh OUT_DIR}")"
cd "$(dirname "$0")/.."
mkdir -p "$out"
python="${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export RELKD_TEST_DEVICE=cuda
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
nvidia-smi >"$out/nvidia-smi.txt" 2>&1
"$python" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__)" \
    >>"$out/summary.txt" 2>&1 || { echo "no usable CUDA torch in $python"; exit 1; }

step tests 150 "$python" -m pytest -q -m "not slow" -p no:cacheprovider
# Generated (Triton) code only: the other slow tests do not depend on the device.
step tests_compile 90 "$python" -m pytest -q -p no:cacheprovider -m slow -k "inductor or fused" \
    tests/test_cuda.py tests/test_compile.py
step bench_eager 60 "$python" -m benchmarks.losses --device cuda --max-textbook-gib 16 --out "$out" --tag _eager
step bench_amp 45 "$python" -m benchmarks.losses --device cuda --amp --max-textbook-gib 16 --batches 256 1024 \
    --out "$out" --tag _amp
step bench_compile 120 "$python" -m benchmarks.losses --device cuda --compile --dynamic \
    --losses rkd_distance rkd_angle sp cc pkt --batches 256 1024 --dims 128 2048 --out "$out" --tag _compile
step bench_banks 30 "$python" -m benchmarks.banks --device cuda --out "$out"

{
    echo "### GPU: $("$python" -c 'import torch; print(torch.cuda.get_device_name())'), $(date -u +%Y-%m-%d)"
    echo
    echo '```'
    cat "$out/summary.txt"
    echo '```'
    for tag in eager amp compile; do
        [ -f "$out/losses_$tag.md" ] && { echo; echo "#### losses, $tag"; echo; cat "$out/losses_$tag.md"; }
    done
    [ -f "$out/banks.md" ] && { echo; echo "#### CRD and HKD scoring"; echo; cat "$out/banks.md"; }
} >"$out/gpu_results.md"
echo "results: $out/gpu_results.md (exit $status)"
exit "$status"
