#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, then record Meta-World demonstrations, fit FAST,
# train ki_vla (tiny preset, CPU) with lerobot-train and evaluate it with LeRobot's evaluation loop
# (examples/metaworld/evaluate.py; --baseline act adds LeRobot's ACT trained and evaluated the same way).
# Extra flags go to main_job.py (e.g. --steps 5000 --tasks ... --preset real --device cuda); unknown
# --policy.* / --dataset.* flags go on to lerobot-train. Progress shows on the console; each stage's full
# output goes to outputs/main_job/<stage>.log.
# Offline by default (HF_HUB_OFFLINE=1); HF_HUB_OFFLINE=0 bash examples/metaworld/run_main_job.sh ... lets
# LeRobot download (e.g. --policy.pretrained_path=lerobot/pi05_base).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" MUJOCO_GL="${MUJOCO_GL:-egl}" PYOPENGL_PLATFORM="${PYOPENGL_PLATFORM:-egl}"
.venv/bin/python examples/metaworld/main_job.py "$@"
