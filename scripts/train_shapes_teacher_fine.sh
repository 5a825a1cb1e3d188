#!/usr/bin/env bash
# Trains the fine shapes-world teacher that anystep ships as shapes_teacher_fine (src/anystep/assets/): three
# runs, about 105 minutes on one thread (2 CPU cores: run it alone). See configs/shapes_teacher_fine.yaml for why
# each step and what it measured. Usage: scripts/train_shapes_teacher_fine.sh [RUNS_DIR]   (default: runs)
# A killed step resumes where it stopped when the script is run again.
set -euo pipefail
runs="${1:-runs}"
later=(model.network=null optim.teacher.lr=1.5e-4 optim.teacher.warmup_steps=0 ema.warmup_steps=0)

# 1. 9000 steps from scratch at lr 5e-4, flow-matching times at the official shift 5
anystep teacher --config shapes_teacher_fine --resume-if-present train.out_dir="$runs/shapes_teacher_fine_base"
# 2. 1000 steps at lr 1.5e-4
anystep teacher --config shapes_teacher_fine --resume-if-present "${later[@]}" \
  model.init="$runs/shapes_teacher_fine_base" train.steps=1000 train.out_dir="$runs/shapes_teacher_fine_lr"
# 3. 2000 steps with the training times at shift 1 (more of them where edges and corners are decided)
anystep teacher --config shapes_teacher_fine --resume-if-present "${later[@]}" teacher.shift=1.0 \
  model.init="$runs/shapes_teacher_fine_lr" train.steps=2000 train.out_dir="$runs/shapes_teacher_fine"
echo "the teacher: $runs/shapes_teacher_fine (sample it: anystep sample $runs/shapes_teacher_fine --steps 32)"
