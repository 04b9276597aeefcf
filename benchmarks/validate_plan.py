"""Predicted against measured: the plan's memory and tokens/s for a grid of training configurations.

    python benchmarks/validate_plan.py                                # numpy engine, default model
    python benchmarks/validate_plan.py --backend webgpu --model random-smollm2   # on a GPU
    python benchmarks/validate_plan.py --backend webgpu --model random-smollm2:2 --grid small  # lavapipe

Calibrates first (cached in $LORALAB_HOME/plan), then runs every configuration in a fresh process (one
warm-up step, the best of two timed steps) and prints a markdown table. On a shared CPU use --clock cpu --threads 1:
process CPU time is what other processes cannot steal, and one BLAS thread keeps OpenBLAS from spinning.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loralabd.plan.measure import markdown, validate  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="numpy", choices=["numpy", "webgpu"])
    ap.add_argument("--model", default="default", help="default | random-smollm2 | a .gguf / HF dir path")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"])
    ap.add_argument("--grid", default=None, choices=["cpu", "gpu", "small"],
                    help="configurations: cpu (numpy default), gpu (webgpu default), small (software adapters)")
    ap.add_argument("--threads", type=int, default=None, help="BLAS threads (numpy backend)")
    ap.add_argument("--parallel", type=int, default=1, help="configurations measured at once (cpu clock only)")
    ap.add_argument("--refresh", action="store_true", help="calibrate again instead of using the cache")
    ap.add_argument("--json", help="also write the raw numbers here")
    a = ap.parse_args()
    res = validate(a.backend, a.model, grid=a.grid, clock=a.clock, threads=a.threads, parallel=a.parallel, refresh=a.refresh)
    print(markdown(res))
    worst_m = max(abs(r["mem_err"]) for r in res["rows"])
    worst_t = max(abs(r["tps_err"]) for r in res["rows"])
    print(f"\nworst memory error {100 * worst_m:.1f}% (target 15%), worst tokens/s error {100 * worst_t:.1f}% "
          f"(target 20%); {res['seconds']:.0f} s in all")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
