#!/usr/bin/env bash
# The committed CPU scaling ladder (benchmarks/scaling/cpu.csv, cpu.png): five tiny Llama sizes,
# 2 ZeRO-3 workers of 1 CPU thread each, 5 optimizer steps per size (the first untimed).
# MFU is against a nominal 0.17 TFLOP/s per worker: the best single-thread fp32 2048^3 GEMM
# this machine reached (`simpo-ray scale ... --peak-tflops gemm` measures it), not a vendor peak.
# About 6-8 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=$(mktemp -d)
HF_HUB_OFFLINE=1 .venv/bin/simpo-ray scale examples/tiny_cpu.yaml "output.root=$out/runs" \
    --sizes xs,s,m,l,xl --steps 5 --peak-tflops 0.17 --out "$out/scale"
cp "$out/scale/scale.csv" benchmarks/scaling/cpu.csv
cp "$out/scale/scale.png" benchmarks/scaling/cpu.png
rm -rf "$out"
