#!/usr/bin/env bash
# One-time set-up on a fresh machine: torch first (the CPU wheel where no torch is present, so that
# no CUDA packages are pulled), then this project editable, with its test extras and the Flower extra
# (Flower and its simulation engine, Ray), so that the test suite covers the Flower path too.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,flower]"
# Flower Datasets' partitioners, for their tests: its metadata asks for datasets<5, which would move datasets and
# huggingface_hub back under transformers; its partitioners work on the installed datasets, so it goes in as is.
python -m pip install -q --no-deps "flwr-datasets==0.6.1" seaborn
