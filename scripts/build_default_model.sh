#!/usr/bin/env bash
# Rebuild the bundled default model (liveserve/assets/default-model) from scratch, deterministically:
# 1000 synthetic training clips (seed 0), the default architecture with random weights (seed 0), then
# three stages on the CPU:
#   1. the vision tower learns to see: trained with a throwaway head to name the shapes and colours in
#      view, frame by frame (liveserve.train.vision_pretrain; trained through the narration loss alone,
#      it learns colour but hardly shape);
#   2. full training of the LM and connector on the dialogues, the tower frozen and its features cached
#      (2000 steps of 4 dialogues at lr 1e-3);
#   3. the same at a lower rate over fuller batches, in another data order (700 steps of 8 dialogues at
#      lr 5e-4): it settles when to speak (within_1s) without losing the words;
# then an evaluation of the trained and untrained model on the held-out set (seed 1000, never trained on).
# About 35 minutes on 2 CPU cores (one thread per process). An interrupted build resumes its stages.
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
rm -rf "$work/init" "$work/vision"
"$python" -c "import sys; from liveserve.model.registry import write_default_init; write_default_init(sys.argv[1])" \
  "$work/init"
"$python" -m liveserve.train.vision_pretrain --data "$work/train" --model "$work/init" --out "$work/vision" \
  --steps 800 --batch 64 --lr 1e-3 --seed 0 --log-every 50 --threads "$threads"
"$python" -m liveserve.cli train --data "$work/train" --out "$work/run" --model "$work/vision" --mode full \
  --steps 2000 --grad-accum 4 --lr 1e-3 --warmup-ratio 0.05 --seed 0 --log-every 50 --save-every 200 \
  --threads "$threads" --resume
"$python" -m liveserve.cli train --data "$work/train" --out "$work/run2" --model "$work/run/model" --mode full \
  --steps 700 --grad-accum 8 --lr 5e-4 --warmup-ratio 0.05 --seed 1 --log-every 50 --save-every 200 \
  --threads "$threads" --resume

rm -rf "$target"
mkdir -p "$target"
cp -r "$work/run2/model/." "$target/"
# The training logs travel with the model: they document how it was made.
cp "$work/vision/vision_pretrain_log.jsonl" "$target/train_log.vision.jsonl"
cp "$work/run/train_log.jsonl" "$target/train_log.stage1.jsonl"
cp "$work/run2/train_log.jsonl" "$target/train_log.stage2.jsonl"

"$python" -m liveserve.cli eval --model default --threads "$threads" --json "$work/eval-trained.json" >/dev/null
"$python" -m liveserve.cli eval --model "$work/init" --threads "$threads" --json "$work/eval-untrained.json" >/dev/null
echo "wrote $target ($(du -sh "$target" | cut -f1)); evaluations in $work/eval-*.json" >&2
