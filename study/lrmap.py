"""
The real model's recovery over learning rate x steps x precision (RESULTS.md, section 1e). From a study's target, GA
with a retain term in pure bf16 at each learning rate, read after several step counts of one run: the loop's lr is
constant and its batches do not depend on the number of steps, so the model after k steps of a longer run is the
k-step model. Every cell is measured at full precision and at each quantized precision, with `kept`
(metrics.mechanism) and the recovery law's prediction (metrics.predicted_retained) beside what was measured.

$ python evaluate.py config/smollm2.py     # first: the target, the retrain model and the data, in out_smollm2
$ python study/lrmap.py                    # -> out_smollm2/lrmap/map.json, out_smollm2/figures/10_lrmap.png, a table
$ python study/lrmap.py --methods ga_gdr_sure --lrs 1e-5,2e-5   # SURE: its saliency mask, at 10x each lr

Each (method, lr) is one unlearning run, written atomically to out_dir/lrmap/ when its cells are measured, keyed on
the settings, the target and the environment: an interrupted map resumes at the run it stopped in.
"""
import copy
import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as python study/lrmap.py: the core is one up
import metrics  # noqa: E402
import model as M  # noqa: E402
from data.prepare import DataConfig, load_data  # noqa: E402
import quantize as QC  # noqa: E402
from evaluate import PRECISIONS, plain  # noqa: E402
from settings import cli, cpu_name, digest, environment, job_threads, write_json  # noqa: E402
from train import bf16_native  # noqa: E402
from unlearn import RetainConfig, UnlearnConfig, load_target, unlearn  # noqa: E402
from unlearn_ga import ga_loss  # noqa: E402

num = lambda v: float("nan") if v is None else v  # a JSON null (plain writes nan as null) back to nan
METHODS = ("ga_gdr", "ga_klr", "ga_gdr_sure", "ga_klr_sure")  # GA with a retain term, and with SURE
KEYS = ("forget_exact", "verbmem_forget", "knowmem_forget", "retain_exact", "holdout_ppl")  # what a cell records


@dataclass
class MapConfig:
    out_dir: str = "out_smollm2"  # a study's directory: its target.pt, retrain.pt and data (python evaluate.py ...)
    fig_dir: str = "out_smollm2/figures"  # where figure 10 goes ('' = none)
    methods: str = "ga_gdr"  # comma list of METHODS
    lrs: str = "1e-5,2e-5,3e-5,1e-4"  # comma list: AdamW learning rates (the paper's is 1e-5)
    steps: str = "50,100,150,200,300"  # comma list: the step counts each run is read at (the run goes to the last)
    precisions: str = "full,rtn6,rtn5"  # the rows of every cell (evaluate.PRECISIONS); rtn and codebooks for kept
    threads: int = 2  # torch threads (in the key: they change float order); the study's job_threads
    device: str = "auto"  # 'auto' = cuda if present, else cpu
    seed: int = 1337  # batch order, as the study's unlearning runs


def rows(model, target, data, precisions, seed):
    """{precision: the cell's metrics} of one bf16 model, each quantized copy measured in float32 arithmetic as
    evaluate.measure_model does, with kept against the target where one is given."""
    res = {}
    for p in precisions:
        q, quant = M.to_dtype(copy.deepcopy(model), torch.float32), {}
        if PRECISIONS[p] is not None:
            _, quant = QC.quantize_with(q, replace(PRECISIONS[p], seed=seed), data)
        m = metrics.measure(q, data, 0)
        res[p] = {k: m[k] for k in KEYS} | dict(forget_exact_seq=m["forget_exact_seq"])
        if quant and target is not None:
            mech = metrics.mechanism(target, model, quant)["all"]
            res[p].update(kept=mech["kept"], moved=mech["moved"])
    return res


def snapshots(steps):
    """An unlearn() pick that keeps a copy of the model after each of `steps` (it is called before every step and
    once after the last, with the model as trained so far) and draws from the whole forget set, as pick=None."""
    kept, calls = {}, [0]

    def pick(model, forget):
        if calls[0] in steps:
            kept[calls[0]] = copy.deepcopy(model).eval()
        calls[0] += 1
        return torch.arange(len(forget))
    return pick, kept


def law(cell, ref, p, k="forget_exact"):
    """Measured and predicted retained % of k at p: the law from the cell's full-precision retained %, its kept at
    p, and the target's own change under p (scale m_t / m_t,q)."""
    ret = lambda q: metrics.retained_pct(cell[q][k], ref["target"][q][k])
    scale = ref["target"]["full"][k] / ref["target"][p][k] if ref["target"][p][k] else float("nan")
    return ret(p), metrics.predicted_retained(ret("full"), num(cell[p].get("kept")), scale)


def run(cfg, method, lr, ref, key):
    """The cells of one (method, lr): one run to the last step count, each snapshot measured."""
    path = Path(cfg.out_dir) / "lrmap" / f"{method}_lr{lr:g}.json"
    old = read(path)
    if old and old["key"] == key:
        return old
    parts = method.split("_")
    steps = sorted(int(s) for s in cfg.steps.split(","))
    ucfg = UnlearnConfig(out_dir=cfg.out_dir, device=cfg.device, dtype="bfloat16", seed=cfg.seed, lr=lr,
                         steps=steps[-1], log_interval=50)
    model, data = load_target(ucfg)
    target = M.to_dtype(copy.deepcopy(model), torch.bfloat16)
    pick, kept = snapshots(set(steps))
    print(f"{method} lr {lr:g}: {steps[-1]} steps, read at {steps}", flush=True)
    _, stats = unlearn(model, data, ga_loss, ucfg, RetainConfig(retain=parts[1], sure=bool(parts[2:])), pick=pick)
    cells = {str(s): rows(M.to_dtype(kept[s], torch.bfloat16), target, data, cfg.precisions.split(","), cfg.seed)
             for s in steps if s in kept}
    res = dict(key=key, method=method, lr=lr, machine=cpu_name(), stats=stats, cells=plain(cells))
    write_json(path, res)
    return res


def read(path):
    """The JSON at path, or None if it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def table(ref, runs, precisions):
    """The map as markdown: per cell the retained % of the exact continuations at each precision (the law's
    prediction and kept beside each quantized one), the retain set's exact match and how many forget bios came
    back at the last precision (extracted there, not at full precision)."""
    qs = [p for p in precisions if p != "full"]
    head = ["method", "lr", "steps", "full"] + [f"{p} (law, kept)" for p in qs] + ["retain exact", f"back at {qs[-1]}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    t = ref["target"]
    lines.append("| target | | | " + " | ".join(f"exact {t[p]['forget_exact']:.2f}" for p in precisions)
                 + f" | {t['full']['retain_exact']:.2f} | |")
    for r in runs:
        for s, cell in r["cells"].items():
            full = metrics.retained_pct(cell["full"]["forget_exact"], t["full"]["forget_exact"])
            cols = []
            for p in qs:
                got, pred = law(cell, ref, p)
                cols.append(f"{got:.0f}% ({pred:.0f}%, {num(cell[p].get('kept')):.2f})")
            back = sum(a == 0 and b == 1 for a, b in zip(cell["full"]["forget_exact_seq"], cell[qs[-1]]["forget_exact_seq"]))
            lines.append(f"| {r['method']} | {r['lr']:g} | {s} | {full:.0f}% | " + " | ".join(cols)
                         + f" | {cell['full']['retain_exact']:.2f} | {back} of {len(cell['full']['forget_exact_seq'])} |")
    return "\n".join(lines)


def figure10(ref, runs, precisions, fig_dir):
    """Retained % of the exact continuations over lr x steps, one panel per precision and method, each cell
    annotated with kept and the law's prediction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from figures import save_png
    methods = list(dict.fromkeys(r["method"] for r in runs))
    fig, axes = plt.subplots(len(methods), len(precisions), figsize=(4.2 * len(precisions), 3.4 * len(methods)),
                             squeeze=False)
    for i, m in enumerate(methods):
        rs = sorted((r for r in runs if r["method"] == m), key=lambda r: r["lr"])
        steps = sorted({int(s) for r in rs for s in r["cells"]})
        for j, p in enumerate(precisions):
            grid, ax = torch.full((len(rs), len(steps)), float("nan")), axes[i][j]
            for a, r in enumerate(rs):
                for b, s in enumerate(steps):
                    cell = r["cells"].get(str(s))
                    if cell is None:
                        continue
                    got, pred = law(cell, ref, p) if p != "full" else (metrics.retained_pct(
                        cell["full"]["forget_exact"], ref["target"]["full"]["forget_exact"]), None)
                    grid[a, b] = got
                    note = f"{got:.0f}" + ("" if pred is None else f"\nlaw {pred:.0f}\nk {num(cell[p].get('kept')):.2f}")
                    ax.text(b, a, note, ha="center", va="center", fontsize=7, color="k" if got >= 50 else "w")
            ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=100, aspect="auto")
            ax.set_xticks(range(len(steps)), steps)
            ax.set_yticks(range(len(rs)), [f"{r['lr']:g}" for r in rs])
            ax.set_xlabel("steps")
            ax.set_ylabel("lr" if j == 0 else "")
            ax.set_title(f"{m} at {p}: retained exact %", fontsize=9)
    return save_png(fig, Path(fig_dir) / "10_lrmap.png")


def main(argv=None):
    (cfg,) = cli(__doc__, MapConfig, argv=argv)
    out, dev = Path(cfg.out_dir), M.pick_device(cfg.device)
    precisions = cfg.precisions.split(",")
    for name in ("target.pt", "retrain.pt"):
        if not (out / name).exists():
            raise SystemExit(f"{out / name} not found: run the study first (python evaluate.py config/smollm2.py)")
    methods = cfg.methods.split(",")
    if set(methods) - set(METHODS):
        raise SystemExit(f"--methods {cfg.methods}: the map runs {', '.join(METHODS)}")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad or precisions[0] != "full":
        raise SystemExit(f"--precisions {cfg.precisions}: start with full, then any of {', '.join(PRECISIONS)}")
    env = environment(dev, "hf", cfg.threads, bf16_native(dev))  # "hf": transformers' version goes in too
    base = dict(target=digest(out / "target.pt"), retrain=digest(out / "retrain.pt"), env=env,
                precisions=precisions, seed=cfg.seed)
    with job_threads(cfg.threads):
        ref_path = out / "lrmap" / "reference.json"
        ref = read(ref_path)
        if not ref or ref["key"] != base:
            loaded = {n: M.load_checkpoint(out / f"{n}.pt", dev) for n in ("target", "retrain")}
            data = load_data(DataConfig(**loaded["target"][1]["data"]), out)
            ref = dict(key=base, machine=cpu_name(),
                       **{n: plain(rows(M.to_dtype(m, torch.bfloat16), None, data, precisions, cfg.seed))
                          for n, (m, _) in loaded.items()})
            write_json(ref_path, ref)
        runs = [run(cfg, m, float(lr), ref, dict(base, method=m, lr=float(lr), steps=cfg.steps))
                for m in methods for lr in cfg.lrs.split(",")]
    write_json(out / "lrmap" / "map.json", dict(reference=ref, runs=runs))  # the whole map, each part with its CPU
    print(table(ref, runs, precisions))
    if cfg.fig_dir:
        print(f"figure: {figure10(ref, runs, precisions, cfg.fig_dir)}")


if __name__ == "__main__":
    main()
