#!/usr/bin/env bash
# Sets up .venv (see setup_env.sh) and runs the whole test suite offline on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh "$@"
export HF_HUB_OFFLINE=1 MUJOCO_GL=egl PYOPENGL_PLATFORM=egl
# --durations: the slowest tests listed at the end, so that a CI run says where its time went.
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=25 tests
