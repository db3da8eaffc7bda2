#!/usr/bin/env bash
# The main job, from a fresh clone: set up .venv, then record Meta-World demonstrations, fit FAST,
# train ki_vla (tiny preset, CPU) with lerobot-train and evaluate it with lerobot-eval.
# Extra flags go to main_job.py (e.g. --steps 5000 --tasks ... --preset real --device cuda).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash scripts/setup_env.sh
export HF_HUB_OFFLINE=1 MUJOCO_GL=egl PYOPENGL_PLATFORM=egl
.venv/bin/python examples/metaworld/main_job.py "$@"
