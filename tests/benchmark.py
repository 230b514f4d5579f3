"""
Times the README's commands from scratch in a scratch out_dir, with peak memory, and prints a markdown table for the
README. Not a test (pytest does not collect it): it takes minutes.

$ python tests/benchmark.py                       # everything
$ python tests/benchmark.py --only model,tests    # a subset: model, unlearn, quantize, evaluate, tests
"""
import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd):
    """(wall seconds, peak RSS in MB) of one command. The peak is the largest of any child so far (getrusage keeps
    one maximum), so a row can repeat an earlier, larger one."""
    t0 = time.time()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="model,unlearn,quantize,evaluate,tests")
    only = ap.parse_args().only.split(",")
    out = Path(tempfile.mkdtemp(prefix="nanounlearn-bench-"))
    py, o = sys.executable, ["--out_dir", str(out)]
    steps = {
        "model": [("python model.py (base, target, retrain)", [py, "model.py", *o])],
        "unlearn": [("python unlearn_ga.py (target present)", [py, "unlearn_ga.py", *o])],
        "quantize": [("python quantize.py --bits 4", [py, "quantize.py", "--bits", "4", *o]),
                     ("python quantize.py --method gptq --bits 4", [py, "quantize.py", "--method", "gptq", *o])],
        "evaluate": [("python evaluate.py (models present)", [py, "evaluate.py", *o, "--fig_dir", str(out / "fig")])],
        "tests": [("python -m pytest", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider"])],
    }
    rows = []
    try:
        for key in steps:
            for name, cmd in steps[key] if key in only else []:
                sec, mb = run(cmd)
                rows.append((name, sec, mb))
                print(f"{name}: {sec:.1f}s, peak {mb:.0f} MB", file=sys.stderr)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}\n\n| command | wall time | peak memory |\n|---|---|---|")
    for name, sec, mb in rows:
        print(f"| `{name}` | {sec:.0f} s | {mb:.0f} MB |")


if __name__ == "__main__":
    main()
