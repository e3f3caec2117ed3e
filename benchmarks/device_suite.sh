#!/usr/bin/env bash
# The accelerator suite (benchmarks/device_suite.py): SiD steps of CIFAR-10 DDPM++ (batch 64/256, fp32/bf16),
# EDM2-XS/-S (batch 32) and one-step sampling of 1,000 images, as a markdown table with images/s, MFU, peak
# device memory and compile time. Under 8 minutes on an H100-class GPU.
#
#   bash benchmarks/device_suite.sh [--out TABLE.md]      # on the accelerator
#   bash benchmarks/device_suite.sh --smoke               # tiny networks: proves it runs anywhere (CPU too)
#
# Compiles are measured cold: the persistent compilation cache is off for the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export SIDA_JAX_COMPILE_CACHE=off
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-3}"
exec "${PYTHON:-python3}" benchmarks/device_suite.py "$@"
