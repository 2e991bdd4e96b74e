"""Print a run's held-out metrics before and after fine-tuning and where its outputs are (end of
`make demo`)."""

import json
import sys
from pathlib import Path


def main(run: str) -> int:
    run = Path(run)
    metrics = json.loads((run / "metrics.json").read_text())
    before, after = metrics.get("before", {}), metrics["after"]
    split, file = metrics.get("heldout", "val"), metrics.get("heldout_file") or metrics["eval_file"]
    steps, scored = metrics["global_step"], metrics.get("after_step", metrics["global_step"])
    print(f"\n== {metrics['recipe']}: held-out {split} split ({file}), {steps} steps"
          + (f"; after: step {scored}, the best checkpoint" if scored != steps else "")
          + " (checkpoints are chosen on the val split)")
    print(f"{'metric':<12}{'before':>10}{'after':>10}")
    for name in sorted(after):
        print(f"{name.removeprefix('eval_'):<12}{before.get(name, float('nan')):>10.3f}{after[name]:>10.3f}")
    print(f"\noutputs in {run}/: adapter_model.safetensors (LoRA + Q-Former), checkpoint-*/, predictions/, "
          "metrics.json, report.md, gallery.html (open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
