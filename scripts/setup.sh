#!/usr/bin/env bash
# Set up .venv with everything the demo and the tests need (CPU PyTorch, all extras).
# Idempotent: a second run only checks. Override the interpreter with PYTHON=...
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
stamp="$VENV/.aiba-setup-$(cat pyproject.toml scripts/setup.sh requirements-ci.txt | sha1sum | cut -c1-12)"
[ -f "$stamp" ] && exit 0

# system libraries (FluidSynth renders the offline mini-Slakh)
if ! ldconfig -p 2>/dev/null | grep -q libfluidsynth.so.3; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libfluidsynth3 >/dev/null
  else
    echo "setup: libfluidsynth3 missing (apt-get install libfluidsynth3); rendering tests will be skipped" >&2
  fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# the CPU build of torch first, pinned, so nothing pulls a CUDA build
"${pip[@]}" install -r requirements-ci.txt
"${pip[@]}" install -e ".[audioldm2,stable-audio,data,eval,test]"
# stable-audio-tools pins ~28 heavy packages: its DiT needs none of them
"${pip[@]}" install --no-deps "stable-audio-tools==0.0.19"
# tests only: xformers' layouts and AttentionBias classes are pure Python (its kernels need
# CUDA and a matching torch, so it is installed without dependencies)
"${pip[@]}" install --no-deps "xformers==0.0.35"
rm -f "$VENV"/.aiba-setup-*
touch "$stamp"
