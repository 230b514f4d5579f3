"""
Times the README's commands from scratch in a scratch out_dir, with peak memory, and prints a markdown table for the
README. Not a test: it takes minutes.

$ python study/benchmark.py                       # everything
$ python study/benchmark.py --only model,tests    # a subset: model, unlearn, quantize, evaluate, tests
$ python study/benchmark.py --quantizers out      # the quantizer table: each quantizer on out/target.pt
$ python study/benchmark.py --step data/models/smollm2   # one fine-tuning step of that model, float32 vs pure bf16
"""
import argparse
import contextlib
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


QUANTIZERS = [  # (row of the README's quantizer table, QuantConfig settings)
    ("RTN int8, LLM.int8's grid, per channel", dict(bits=8, absmax=True)),
    ("RTN int4, Eq. 2, per channel", dict(bits=4)),
    ("RTN int4, asym, group 32", dict(bits=4, group_size=32, sym=False)),
    ("RTN int3, per channel", dict(bits=3)),
    ("RTN int2, asym, group 32", dict(bits=2, group_size=32, sym=False)),
    ("GPTQ 8-bit", dict(method="gptq", bits=8)),
    ("GPTQ 4-bit, per channel", dict(method="gptq", bits=4)),
    ("GPTQ 4-bit, asym, group 32", dict(method="gptq", bits=4, group_size=32, sym=False)),
    ("GPTQ 3-bit", dict(method="gptq", bits=3)),
    ("GPTQ 2-bit, asym, group 32", dict(method="gptq", bits=2, group_size=32, sym=False)),
    ("NF4 (block 64)", dict(method="nf4")),
    ("FP4 (block 64)", dict(method="fp4"))]


def quantizer_table(out_dir):
    """Each quantizer on out_dir/target.pt: its seconds, its mean relative output error on held-out general text,
    and the change of held-out perplexity, as a markdown table."""
    import copy
    sys.path.insert(0, str(ROOT))
    import model as M
    import quantize as QC
    from data.prepare import load_data
    target, ckpt = M.load_checkpoint(Path(out_dir) / "target.pt")
    data = load_data(ckpt["data"], out_dir)
    ppl = M.perplexity(target, data.general_val)
    print(f"perplexity at full precision {ppl:.1f}, {torch_threads()} thread(s)\n\n| quantizer | seconds | rel. output "
          f"error | perplexity change |\n|---|---|---|---|")
    for name, kw in QUANTIZERS:
        model = copy.deepcopy(target)
        _, quant = QC.quantize_with(model, QC.QuantConfig(**kw), data)
        print(f"| {name} | {quant['seconds']:.2f} | {quant['rel_output_error']:.1e} | "
              f"{M.perplexity(model, data.general_val) - ppl:+.2f} |")


def step_times(hf_dir, batch=16, T=48, repeat=2):
    """Seconds of one fine-tuning step (forward, backward, AdamW) of the Hugging Face model in hf_dir on a batch of
    the study's shape (16 windows of 48 tokens), the better of `repeat` steps each: float32; pure bf16 with the
    hardware's bf16 matmuls (fast only with AVX512-BF16 or AMX; torch emulates them elsewhere); pure bf16 with the
    matmuls in float32 (train.Bf16Matmuls), what the study runs where train.bf16_native says no; and float32
    weights and AdamW with bf16 autocast (train.py --amp), its matmuls as train.py runs them (Bf16Matmuls where
    slow)."""
    import torch
    sys.path.insert(0, str(ROOT))
    import pretrained
    import train
    from settings import cpu_name
    native = train.bf16_native("cpu")
    print(f"{cpu_name()}, {os.cpu_count()} cores, {torch_threads()} thread(s), torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; bf16 arithmetic judged {'native' if native else 'slow'} "
          f"(train.bf16_native)\n\n| weights | arithmetic | seconds a step |\n|---|---|---|")
    for stored, mode, amp in ((torch.float32, False, False), (torch.bfloat16, False, False),
                              (torch.bfloat16, True, False), (torch.float32, not native, True)):
        model = pretrained.load_base(hf_dir, T, "cpu", stored).train()
        opt = train.adamw(model.parameters(), stored, lr=1e-5)
        x = torch.randint(0, model.hf.config.vocab_size, (batch, T), generator=torch.Generator().manual_seed(0))
        best = float("inf")
        for _ in range(repeat):
            t0 = time.time()
            with train.Bf16Matmuls() if mode else contextlib.nullcontext():
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    _, loss = model(x, x)
                opt.zero_grad()
                loss.backward()
            opt.step()
            best = min(best, time.time() - t0)
        matmuls = "float32 (Bf16Matmuls)" if mode else "bf16" if amp or stored == torch.bfloat16 else "float32"
        arithmetic = f"matmuls in {matmuls}" + (" (--amp)" if amp else "")
        print(f"| {str(stored)[6:]} | {arithmetic} | {best:.2f} |", flush=True)


def torch_threads():
    import torch
    return torch.get_num_threads()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="model,unlearn,quantize,evaluate,tests")
    ap.add_argument("--quantizers", metavar="OUT_DIR", help="print the quantizer table of OUT_DIR/target.pt")
    ap.add_argument("--step", metavar="HF_DIR",
                    help="time a fine-tuning step of that model: float32, pure bf16 in bf16 and in float32 "
                         "arithmetic, and --amp")
    args = ap.parse_args()
    if args.quantizers:
        return quantizer_table(args.quantizers)
    if args.step:
        return step_times(args.step)
    only = args.only.split(",")
    out = Path(tempfile.mkdtemp(prefix="nanounlearn-bench-"))
    py, o = sys.executable, ["--out_dir", str(out)]
    steps = {
        "model": [("python train.py (base, target, retrain)", [py, "train.py", *o])],
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
    sys.path.insert(0, str(ROOT))
    from settings import cpu_name
    print(f"\n{cpu_name()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}\n\n| command | wall time | peak memory |\n|---|---|---|")
    for name, sec, mb in rows:
        print(f"| `{name}` | {sec:.0f} s | {mb:.0f} MB |")


if __name__ == "__main__":
    main()
