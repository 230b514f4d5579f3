"""
When does quantization bring unlearned text back? The study once per condition (README, "When does quantization
recover unlearned knowledge?"): learning rate x weight storage (float32 / pure bf16), steps, the retain weight, the
target (no base, a longer base, width 256, trained in pure bf16) and three seeds, each at eight precisions. A
condition is data: the settings of its target and of its unlearning runs as values.

$ python sweep.py                    # -> out/sweep.json, figures/6_when.png, and the headline tables (printed)

Each condition is a cached study in out/sweep/<target settings>/<unlearning settings>/ beside a target and retrain
trained once per target settings, so an interrupted sweep resumes where it stopped.
"""
import hashlib
import os
import platform
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

import evaluate
import model as M
from data.prepare import DataConfig
from evaluate import CONSTRAINED, RETAINED, SURE, logged, mean_sd, plain
from figures import save_png
from settings import cli
from train import TrainConfig, train_all

FOUR_BIT = ("rtn4", "rtn4_asym", "rtn4_g64", "gptq4", "nf4", "fp4")
FINDING2 = ("ga", "sga", "tau")
PAPER_RECOVERY = 83 - 21  # points: the paper's retained knowledge at 4 bits minus at full precision
REFERENCES = (("float32", {}), ("bfloat16", dict(lr=1e-4, steps=100)))  # the default study, and pure bf16 where
# only part of the weights move; the other axes and the seeds vary one thing from each of them


def condition(axis, dtype, unlearn, train=None, seed=1337, methods=CONSTRAINED):
    """One condition: its axis (a label), the target's settings (TrainConfig and DataConfig fields) and seed, the
    unlearning runs' dtype and settings (UnlearnConfig/RetainConfig fields), and the methods it runs."""
    return dict(axis=axis, train=train or {}, seed=seed, dtype=dtype, unlearn=unlearn, methods=list(methods))


SWEEP = [
    *[condition("lr", d, dict(lr=lr, steps=100)) for d, _ in REFERENCES for lr in (3e-5, 1e-4, 3e-4, 1e-3)],
    *[condition("lr 3e-5, 300 steps", d, dict(lr=3e-5, steps=300)) for d, _ in REFERENCES],
    *[condition("seed", d, u, seed=s, methods=CONSTRAINED + SURE + FINDING2) for d, u in REFERENCES
      for s in (1337, 1338, 1339)],
    *[condition(axis, d, {**u, **extra}, train) for d, u in REFERENCES for axis, train, extra in (
        ("alpha 3", {}, dict(alpha=3)), ("no base", dict(base_steps=0), {}), ("base x10", dict(base_steps=1000), {}),
        ("width 256", dict(n_embd=256), {}), ("bf16 target", dict(dtype="bfloat16"), {}))]]


@dataclass
class SweepConfig:
    out_dir: str = "out"  # the conditions go in out_dir/sweep/, the results in out_dir/sweep.json
    fig_dir: str = "figures"  # where figure 6 goes ('' = none)
    precisions: str = "fp32,int8,rtn4,rtn4_asym,rtn4_g64,gptq4,nf4,fp4"  # every condition's rows
    device: str = "auto"  # 'auto' = cuda if present, else cpu
    workers: int = 0  # worker processes of each study; 0 = one per CPU core up to 4


def slug(settings):
    """A directory name for settings: {'lr': 1e-4, 'steps': 100} -> 'lr_0.0001_steps_100'; past 80 characters,
    the first 64 and a hash of the whole."""
    args = " ".join(f"{k} {v}" for k, v in settings.items())
    name = re.sub(r"[^\w.-]+", "_", args).strip("_") or "default"
    return name if len(name) <= 80 else f"{name[:64]}_{hashlib.sha1(args.encode()).hexdigest()[:12]}"


def flags(settings):
    """The command-line form of settings: {'lr': 1e-4, 'steps': 100} -> '--lr 0.0001 --steps 100'."""
    return " ".join(f"--{k} {v}" for k, v in settings.items())


def sweep(cfg, conditions=SWEEP):
    """The study once per condition, in out_dir/sweep/<target settings>/<unlearning settings>/ beside a target and
    retrain trained once per target settings (linked in); conditions measured before are read back from their rows.
    Writes out_dir/sweep.json (every condition's rows and retained %, and the headline over seeds) and
    fig_dir/6_when.png."""
    root, t0, conds = Path(cfg.out_dir) / "sweep", time.time(), []
    for i, c in enumerate(conditions):
        tdir = root / slug({**c["train"], "seed": c["seed"]})
        if not all((tdir / f).exists() for f in ("target.pt", "retrain.pt")):
            own = {f.name for f in fields(TrainConfig)}  # the others are DataConfig's
            tcfg = TrainConfig(**{k: v for k, v in c["train"].items() if k in own}, out_dir=str(tdir), seed=c["seed"],
                               device=cfg.device)
            logged(tdir / "logs" / "train.log", train_all, tcfg,
                   DataConfig(**{k: v for k, v in c["train"].items() if k not in own}))
        cdir = tdir / slug({"dtype": c["dtype"], **c["unlearn"]})
        cdir.mkdir(parents=True, exist_ok=True)
        for f in ("target.pt", "retrain.pt", "train.json", "data"):
            if not (cdir / f).is_symlink():
                (cdir / f).symlink_to(Path("..") / f)
        argv = ["--out_dir", str(cdir), "--fig_dir", "", "--methods", ",".join(c["methods"]), "--precisions",
                cfg.precisions, "--seed", str(c["seed"]), "--device", cfg.device, "--workers", str(cfg.workers),
                "--el_stride", "0", "--dtype", c["dtype"], "--unlearn_args", flags(c["unlearn"])]
        res = logged(cdir / "logs" / "study.log", evaluate.main, argv)
        conds.append(dict(c, dir=str(cdir.relative_to(root)), retained=res["retained"], rows=res["rows"]))
        got = {p: res["retained"].get(p, {}).get("constrained", {}).get("verbmem_forget") for p in ("fp32", "rtn4")}
        moved, back, kept = (mech_mean(conds[-1], k) for k in ("mech_moved", "mech_same_moved", "mech_kept"))
        print(f"[{time.time() - t0:5.0f}s] {i + 1}/{len(conditions)} {c['axis']}: {c['dtype']} "
              f"{c['unlearn'] or 'defaults'}, target {c['train'] or 'defaults'}, seed {c['seed']} | retained VerbMem % "
              + " ".join(
                  f"{p} {'n/a' if v is None else f'{v:.0f}'}" for p, v in got.items())
              + f" | rtn4: moved {moved:.0%}, of them back {back:.0%}, update kept {kept:.2f}", flush=True)
    results = plain(dict(meta=dict(settings=asdict(cfg), precisions=cfg.precisions.split(","),
                                   seconds=round(time.time() - t0, 1), machine=dict(
                                       platform=platform.platform(), cpu_count=os.cpu_count())),
                         headline=headline(conds), conditions=conds))
    M.write_json(Path(cfg.out_dir) / "sweep.json", results)
    sweep_report(results)
    if cfg.fig_dir:
        figure6(results, cfg.fig_dir)
    print(f"wrote {Path(cfg.out_dir) / 'sweep.json'} ({results['meta']['seconds']:.0f}s)")
    return results


def mech_mean(cond, key, precision="rtn4"):
    """The mean over the utility-constrained methods of a mechanism statistic of a sweep condition."""
    return float(np.mean([r.get(key, np.nan) for r in cond["rows"]
                          if r["model"] in CONSTRAINED and r["precision"] == precision]))


def headline(conds):
    """Mean and standard deviation over the seeds of each reference: retained % per group and precision, and for
    finding 2, per method at full precision, the outlier counts and the extraction attacks' success."""
    out = {}
    for dtype, _ in REFERENCES:
        seeds = [c for c in conds if c["axis"] == "seed" and c["dtype"] == dtype]
        if not seeds:
            continue
        ret = {p: {g: {k: mean_sd([c["retained"][p][g][k] for c in seeds]) for k in RETAINED}
                   for g in seeds[0]["retained"][p]} for p in seeds[0]["retained"]}
        rows = [{(r["model"], r["precision"]): r for r in c["rows"]} for c in seeds]
        f2 = {m: {k: mean_sd([by[m, "fp32"][k] for by in rows]) for k in (
            "outliers_low", "outliers_high", "forget_exact", "extraction_top_k", "forget_ma")}
              for m in ("target", *FINDING2, *CONSTRAINED, *SURE) if (m, "fp32") in rows[0]}
        out[dtype] = dict(seeds=[c["seed"] for c in seeds], retained=ret, finding2=f2)
    return out


def sweep_report(results):
    """The headline over seeds as markdown tables: retained % per precision for each reference, and finding 2."""
    ms = lambda v, scale=1, f=".1f": "n/a" if v is None else f"{scale * v[0]:{f}} ± {scale * v[1]:{f}}"
    for dtype, h in results["headline"].items():
        groups = list(h["retained"]["fp32"])
        label = dict(verbmem_forget="VerbMem", knowmem_forget="KnowMem", forget_exact="exact")
        print(f"\nretained % ({dtype} reference, seeds {h['seeds']}, mean ± sd)\n\n| precision | " + " | ".join(
            f"{g} {label[k]}" for g in groups for k in RETAINED) + " |\n" + "|---" * (1 + 3 * len(groups)) + "|")
        for p, r in h["retained"].items():
            print(f"| {p} | " + " | ".join(ms(r[g][k]) for g in groups for k in RETAINED) + " |")
        print("\n| method (fp32) | MA ≤ 0.15 | MA ≥ 0.60 | extracted % | top-10 extracted % | mean MA |\n"
              + "|---" * 6 + "|")
        for m, r in h["finding2"].items():
            print(f"| {m} | {ms(r['outliers_low'])} | {ms(r['outliers_high'])} | {ms(r['forget_exact'], 100)} | "
                  f"{ms(r['extraction_top_k'], 100)} | {ms(r['forget_ma'], f='.2f')} |")


def figure6(results, fig_dir="figures"):
    """Figure 6 from a sweep dict (out/sweep.json): recovery (retained VerbMem % at a precision minus at
    full precision, mean of the utility-constrained methods) against the learning rate per weight dtype and
    quantizer; retained % itself; the mechanism at rtn4; the other axes; the seeds' headline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    conds, dtypes = results["conditions"], [d for d, _ in REFERENCES]
    ret = lambda c, p, g="constrained": np.nan if c["retained"].get(p, {}).get(g, {}).get(
        "verbmem_forget") is None else c["retained"][p][g]["verbmem_forget"]
    rec = lambda c, p: ret(c, p) - ret(c, "fp32")
    grid = {d: sorted(((c["unlearn"]["lr"], c) for c in conds if c["axis"] == "lr" and c["dtype"] == d),
                      key=lambda lc: lc[0]) for d in dtypes}
    fig, axes = plt.subplots(2, 3, figsize=(19, 10), layout="constrained")
    for ax, d in zip(axes[0, :2], dtypes):
        for p in ("int8", *FOUR_BIT):
            ax.plot([lr for lr, _ in grid[d]], [rec(c, p) for _, c in grid[d]], marker="o", label=p,
                    ls="--" if p == "int8" else "-")
        ax.axhline(0, color="black", lw=0.6)
        ax.axhline(PAPER_RECOVERY, color="grey", ls=":", label="the paper: 21% → 83%")
        ax.set(xscale="log" if grid[d] else "linear", xlabel="learning rate (100 steps)", ylim=(-10, 70),
               ylabel="recovery: retained VerbMem % at p − at full", title=f"{d} weights")
    axes[0, 0].legend(fontsize=8)
    for d, ls in zip(dtypes, ("-", "--")):
        for p, color in (("fp32", "tab:blue"), ("rtn4", "tab:red")):
            axes[0, 2].plot([lr for lr, _ in grid[d]], [ret(c, p) for _, c in grid[d]], marker="o", ls=ls,
                            color=color, label=f"{d}, {'full precision' if p == 'fp32' else p}")
        for key, marker, color, what in (
                ("mech_moved", "o", "tab:green", "share of weights moved"),
                ("mech_same_moved", "s", "tab:purple", "moved ones back on the target's rtn4 code"),
                ("mech_kept", "^", "tab:orange", "update kept by rounding, ⟨Q(θ_u) − Q(θ_o), δ⟩ / |δ|²")):
            axes[1, 0].plot([lr for lr, _ in grid[d]], [mech_mean(c, key) for _, c in grid[d]], marker=marker,
                            ls=ls, color=color, label=f"{d}: {what}")
    scale = "log" if any(grid.values()) else "linear"
    axes[0, 2].set(xscale=scale, xlabel="learning rate (100 steps)", ylabel="retained VerbMem %",
                   title="retained knowledge (paper: 21% full, 83% 4-bit)")
    axes[0, 2].legend(fontsize=8)
    axes[1, 0].set(xscale=scale, ylim=(0, 1.1), xlabel="learning rate (100 steps)", ylabel="share",
                   title="the mechanism at rtn4")
    axes[1, 0].legend(fontsize=8)
    others = list(dict.fromkeys(c["axis"] for c in conds if c["axis"] not in ("lr", "seed")))
    ref = {d: next((c for c in conds if c["axis"] == "seed" and c["dtype"] == d and c["seed"] == 1337), None)
           for d in dtypes}
    labels, w = ["reference", *others], 0.8 / len(dtypes)
    for j, d in enumerate(dtypes):
        pick = [ref[d]] + [next((c for c in conds if c["axis"] == a and c["dtype"] == d), None) for a in others]
        axes[1, 1].bar(np.arange(len(labels)) + (j - 0.5) * w, [np.nan if c is None else rec(c, "rtn4")
                                                               for c in pick], w, label=d)
    axes[1, 1].axhline(0, color="black", lw=0.6)
    axes[1, 1].axhline(PAPER_RECOVERY, color="grey", ls=":", label="the paper")
    axes[1, 1].set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes[1, 1].set(ylabel="recovery at rtn4 (points)", title="the other conditions", ylim=(-10, 70))
    axes[1, 1].legend(fontsize=8)
    shown, bars = ["fp32", "int8", *FOUR_BIT], []
    for d in dtypes:
        for g in ("constrained", "sure"):
            h = results["headline"].get(d, {}).get("retained", {})
            if all(h.get(p, {}).get(g, {}).get("verbmem_forget") for p in shown):
                bars.append((f"{d}, {g}", [h[p][g]["verbmem_forget"] for p in shown]))
    w = 0.8 / max(1, len(bars))
    for j, (name, ms) in enumerate(bars):
        axes[1, 2].bar(np.arange(len(shown)) + (j - (len(bars) - 1) / 2) * w, [m for m, _ in ms], w,
                       yerr=[s for _, s in ms], capsize=2, label=name)
    axes[1, 2].set_xticks(range(len(shown)), shown, rotation=30, ha="right")
    axes[1, 2].set(ylabel="retained VerbMem %", title="the references over seeds (mean ± sd)", ylim=(0, 100))
    if bars:
        axes[1, 2].legend(fontsize=8, ncol=2, loc="upper right")
    fig.suptitle("6. When does quantization bring unlearned text back? (utility-constrained GA/NPO, mean of 4)")
    return save_png(fig, Path(fig_dir) / "6_when.png")


if __name__ == "__main__":
    sweep(*cli(__doc__, SweepConfig))
