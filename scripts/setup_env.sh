#!/usr/bin/env bash
# Creates (or reuses) .venv with Python 3.12 and installs lerobot_ki with its test and Meta-World extras.
# Usage: bash scripts/setup_env.sh [--fresh]
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  for cand in python3.12 /root/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  echo "Python 3.12 not found: LeRobot 0.6 needs it (install it, e.g. with pyenv, and retry)." >&2
  return 1
}

if [[ "${1:-}" == "--fresh" ]]; then rm -rf .venv; fi
if [[ ! -x .venv/bin/python ]]; then
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test,metaworld]"

# Offscreen MuJoCo rendering (Meta-World) needs EGL from Mesa and a GL library for PyOpenGL (libOpenGL, or
# GLES2 as its fallback); install them where we can (root, Debian). The same list as EGL_PACKAGES in
# examples/metaworld/record_dataset.py and README.
EGL_PACKAGES="libegl1 libegl-mesa0 libgl1-mesa-dri libopengl0 libgles2"
# (grep without -q reads all of ldconfig's output: no SIGPIPE to trip pipefail)
if ! ldconfig -p 2>/dev/null | grep "libEGL.so.1" >/dev/null || ! ldconfig -p 2>/dev/null | grep "libOpenGL.so.0" >/dev/null; then
  if [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $EGL_PACKAGES >/dev/null) \
      || echo "warning: could not install Mesa EGL; Meta-World rendering will fail (see README)" >&2
  else
    echo "warning: libEGL or libOpenGL not found; install Mesa EGL (Debian: $EGL_PACKAGES) for Meta-World" >&2
  fi
fi
echo "environment ready: $(.venv/bin/python --version), $(.venv/bin/python -c 'import lerobot; print("lerobot", lerobot.__version__)')"
