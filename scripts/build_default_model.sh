#!/usr/bin/env bash
# Rebuild the bundled default model (liveserve/assets/default-model) from scratch, deterministically:
# 1000 synthetic training clips (seed 0), the default architecture with random weights (seed 0), full
# training on the CPU in two stages (1700 steps at lr 1e-3, then 1000 steps at lr 5e-4 with another data
# order), then an evaluation of the trained and untrained model on the held-out set (seed 1000, never
# trained on). About 40 minutes on 2 CPU cores.
#   WORK=dir   where data, checkpoints and reports go (default: out/default-model-build)
#   PYTHON=..  the interpreter with liveserve installed (default: .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
work="${WORK:-out/default-model-build}"
target=liveserve/assets/default-model
threads="${THREADS:-1}"  # one thread per process: on a shared 2-core machine more threads only spin
mkdir -p "$work"

if [ ! -f "$work/train/dialogues.json" ]; then
  "$python" -m liveserve.cli data synth --out "$work/train" --videos 1000 --seed 0 >/dev/null
fi
rm -rf "$work/init"
"$python" -c "import sys; from liveserve.model.registry import write_default_init; write_default_init(sys.argv[1])" \
  "$work/init"
"$python" -m liveserve.cli train --data "$work/train" --out "$work/run" --model "$work/init" --mode full \
  --steps 1700 --grad-accum 8 --lr 1e-3 --warmup-ratio 0.05 --seed 0 --log-every 25 --save-every 200 \
  --threads "$threads" --resume
"$python" -m liveserve.cli train --data "$work/train" --out "$work/run2" --model "$work/run/model" --mode full \
  --steps 1000 --grad-accum 8 --lr 5e-4 --warmup-ratio 0.05 --seed 1 --log-every 25 --save-every 200 \
  --threads "$threads" --resume

rm -rf "$target"
mkdir -p "$target"
cp -r "$work/run2/model/." "$target/"
# The training logs travel with the model: they document how it was made.
cp "$work/run/train_log.jsonl" "$target/train_log.stage1.jsonl"
cp "$work/run2/train_log.jsonl" "$target/train_log.stage2.jsonl"

"$python" -m liveserve.cli eval --model default --threads "$threads" --json "$work/eval-trained.json" >/dev/null
"$python" -m liveserve.cli eval --model "$work/init" --threads "$threads" --json "$work/eval-untrained.json" >/dev/null
echo "wrote $target ($(du -sh "$target" | cut -f1)); evaluations in $work/eval-*.json" >&2
