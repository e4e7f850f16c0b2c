#!/usr/bin/env bash
# The digits CNN end to end from the command line: search, report, apply, and a worker joining.
#
#   bash examples/cli_digits.sh            # from the repository root, in the project's virtualenv
#
# The model comes from examples/digits_factory.py (trained once, cached in examples/.cache); the
# search maximises validation accuracy under a FLOP budget of 70% of the original, on 1 thread.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-runs/cli_digits}
TRIALS=${TRIALS:-30}
mkdir -p "$RUNS"
rm -f "$RUNS/study.db"

common=(
  examples.digits_factory:trained_cnn
  --input-shape 1,1,16,16
  --eval-fn examples.digits_factory:validation_accuracy
  --search-space convnet
  --target-flops 0.7
  --storage "$RUNS/study.db" --study-name digits
  --threads 1
)

echo "== ranksearch optimize ($TRIALS trials)"
ranksearch optimize "${common[@]}" --trials "$TRIALS" --seed 0 --out "$RUNS/out"

echo
echo "== ranksearch worker: the same study, $((TRIALS + 10)) trials in total"
ranksearch worker "${common[@]}" --trials $((TRIALS + 10)) --no-progress

echo
echo "== ranksearch report from the storage (the study now holds the worker's trials too)"
ranksearch report --storage "$RUNS/study.db" --study-name digits --out "$RUNS/report"

echo
echo "== ranksearch apply: the plan to the original weights, as a torch.export program"
ranksearch apply "$RUNS/out/plan.json" examples.digits_factory:trained_cnn --input-shape 1,1,16,16 \
  --out "$RUNS/digits_small.pt2"

echo
echo "== the exported program, loaded back, scored on digits the search never saw"
python - "$RUNS/digits_small.pt2" <<'PY'
import sys
import torch
from examples.digits_factory import held_out_accuracy, trained_cnn

program = torch.export.load(sys.argv[1]).module()
# the export was traced at batch 1: score one digit at a time
class OneByOne(torch.nn.Module):
    def forward(self, x):
        return torch.cat([program(x[i:i + 1]) for i in range(len(x))])
print(f"held-out accuracy: original {held_out_accuracy(trained_cnn()):.4f}, "
      f"exported compressed {held_out_accuracy(OneByOne()):.4f}")
PY
ls -l "$RUNS/out" "$RUNS/report"
