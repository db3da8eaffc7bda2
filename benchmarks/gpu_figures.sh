#!/usr/bin/env bash
# Every GPU figure the README's inference and rollout tables quote, in one run on one card (full size,
# bf16, random weights, batch 1, chunk 50, 10 Euler steps), written to OUTDIR as logs and JSON.
#
#     bash benchmarks/gpu_figures.sh OUTDIR          # PYTHON=... to pick the interpreter
#
# In order of what matters most, each step under its own time limit so that a slow one (torch.compile's
# autotuning) cannot cost the others; a step that fails or times out leaves its partial log:
#   1. issue 17: ki_vla's inference optimisations (each on its own, taking turns, chunks checked against
#      today's sampler), LeRobot pi05 (eager) and pi0_fast, 1-3 cameras;
#   2. issue 16: one chunk sync / training-time RTC / RTC-guided, real preset;
#   3. ki_vla with the compiled expert, torch.compile's default and max-autotune-no-cudagraphs modes,
#      2 cameras; the first call's (compile) time is in the JSON as first_ms;
#   4. a kernel profile of the default sampler (benchmarks/profile_ki_inference.py): where the time goes;
#   5. only with T5 set (it did not return within 315 s on an H200): LeRobot pi05 with its own
#      compile_model=true (its default mode, max-autotune), 2 cameras.
# The time limits (seconds) fit steps 1-4 in 10 minutes: T1 T2 T3 T4 override them.
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu_figures.sh OUTDIR}
py=${PYTHON:-python}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
$py -c "import torch, transformers, lerobot; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'lerobot', lerobot.__version__, torch.cuda.get_device_name())" | tee -a "$out/gpu.txt"

step() {  # step NAME LIMIT ARGS...: run one benchmark under `timeout`, log to OUTDIR/NAME.log
    local name=$1 limit=$2
    shift 2
    local t0=$SECONDS
    echo "== $name (limit ${limit}s): $*"
    timeout "$limit" $py "$@" 2>&1 | tee "$out/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$out/$name.log"
}

step issue17_full "${T1:-190}" "$here/vs_pi05_pi0fast.py" --size full --no-train --ki-variants issue17 \
    --policies ki_vla,pi05,pi0_fast --warmup 2 --repeats 8 --json "$out/issue17_full.json"
step rollout_real "${T2:-75}" "$here/rollout_timing.py" --preset real --device cuda --dtype bfloat16 \
    --repeats 10
step compiled_full "${T3:-160}" "$here/vs_pi05_pi0fast.py" --size full --no-train --ki-variants compiled \
    --policies ki_vla --cameras 2 --json "$out/compiled_full.json"
step profile_full "${T4:-110}" "$here/profile_ki_inference.py"
if [ -n "${T5:-}" ]; then
    step pi05_compiled_full "$T5" "$here/vs_pi05_pi0fast.py" --size full --no-train \
        --policies pi05_compiled --cameras 2 --json "$out/pi05_compiled_full.json"
fi
