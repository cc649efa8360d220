#!/usr/bin/env bash
# The checks that only mean something on a GPU, in one run sized for about 8 minutes on one H100/H200:
#   1. the tests marked `gpu` (CUDA against the CPU reference, the FlashInfer, flash-attn and FlexAttention
#      kernels against SDPA where their libraries are installed, the KV pool's share of the memory left
#      after the weights);
#   2. `liveserve bench capacity` at VideoLLM-online-8B's sizes (the llama3-8b-siglip preset: random
#      weights, bf16, frames as pixels so the vision tower is timed too), once per attention kernel in
#      KERNELS (default "auto flex"; auto is FlashInfer where flashinfer-python is installed, else
#      flash-attn where installed, else SDPA); then once more with CUDA graphs of the direct forward
#      (`--cuda-graphs`: the single-stream comparison and one level).
# What it writes, in OUT (default out/gpu-check): gpu.txt (the device), tests.log, capacity-<kernel>.json
# and .log, capacity-auto-graphs.json and .log. Run from anywhere; it needs a CUDA build of torch,
# transformers, safetensors, pytest and hypothesis, and nothing of the serving stack (Ray, Redis):
# liveserve is copied into a private directory, laid out as setup.py installs it, without its
# dependencies.
#   OUT=dir        where the results go
#   WHEELS=dir     install these wheels first (pip, no index): for a machine without a package index
#   PYTHON=...     the interpreter (default: python3)
#   PRESET=name    the capacity preset (default: llama3-8b-siglip)
#   SWEEP_MAX=N    the largest stream count of the capacity sweep (default: 512)
#   DURATION=S, WARMUP=S, SINGLE_FRAMES=N
#                  each capacity level's length and unmeasured start (default: 4 and 1 s), and the frames
#                  of the single-stream comparison (default: 64); smaller only to check this script
#   KERNELS="..."  the attention kernels to bench (default: "auto flex"; e.g. "flashinfer sdpa flex")
#   ALLOW_CPU=1    run on the CPU when there is no CUDA device (a check of this script: the GPU tests skip,
#                  and the bench uses the CPU with PRESET, e.g. tiny)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-python3}"
out="$(mkdir -p "${OUT:-$root/out/gpu-check}" && cd "${OUT:-$root/out/gpu-check}" && pwd)"
preset="${PRESET:-llama3-8b-siglip}"
sweep_max="${SWEEP_MAX:-512}"
duration="${DURATION:-4}"
warmup="${WARMUP:-1}"
single_frames="${SINGLE_FRAMES:-64}"
site="$(mktemp -d)"
trap 'rm -rf "$site"' EXIT

say() { echo "gpu_check: $*" >&2; }

if [ -n "${WHEELS:-}" ]; then
  say "installing the wheels in $WHEELS"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl
fi
say "laying liveserve out in a private directory (no dependencies, no build tools needed)"
# As setup.py installs it: the serving stack's top-level folders become liveserve's subpackages.
cp -r "$root/liveserve" "$site/liveserve"
for part in services loadtest orchestration; do rm -rf "$site/liveserve/$part"; cp -r "$root/$part" "$site/liveserve/$part"; done
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
cd "$site"  # not the repository: `liveserve` must be the installed package, with its serving folders mapped

device=cuda
if ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  [ "${ALLOW_CPU:-}" = 1 ] || { say "no CUDA device (ALLOW_CPU=1 checks this script on the CPU)"; exit 2; }
  device=cpu
fi
if [ "$device" = cuda ] && command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/gpu.txt"
else
  "$python" -c "import platform, torch; print(platform.processor() or platform.machine(), 'torch', torch.__version__)" \
    >"$out/gpu.txt"
fi
say "device: $(head -1 "$out/gpu.txt")"

status=0
say "the GPU tests"
"$python" -m pytest -q -p no:cacheprovider --rootdir "$root" -m gpu "$root/tests/test_gpu.py" \
  "$root/tests/test_capacity.py" >"$out/tests.log" 2>&1 || status=1
tail -3 "$out/tests.log" >&2

for kernel in ${KERNELS:-auto flex}; do
  say "bench capacity: $preset, attention $kernel"
  "$python" -m liveserve.cli bench capacity --preset "$preset" --device "$device" --input pixels \
    --attention "$kernel" --sweep-max "$sweep_max" --refine 1 --duration "$duration" --warmup "$warmup" \
    --prefill-frames 16 --single-frames "$single_frames" \
    --json "$out/capacity-$kernel.json" >"$out/capacity-$kernel.log" 2>&1 || status=1
  tail -4 "$out/capacity-$kernel.log" >&2
done
if [ "$device" = cuda ]; then
  # CUDA graphs of the direct forward: the single-stream comparison (launch-bound) and one level
  say "bench capacity: $preset, attention auto, CUDA graphs (single stream and one level)"
  "$python" -m liveserve.cli bench capacity --preset "$preset" --device cuda --input pixels --cuda-graphs \
    --sessions 1 --duration 2 --warmup 0.5 --prefill-frames 16 \
    --json "$out/capacity-auto-graphs.json" >"$out/capacity-auto-graphs.log" 2>&1 || status=1
  tail -4 "$out/capacity-auto-graphs.log" >&2
fi
say "results in $out"
exit "$status"
