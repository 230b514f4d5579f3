"""
When does quantization bring unlearned text back? The study once per condition (RESULTS.md, the archive's
toy sweep and scale sections): learning rate x weight storage (float32 / pure bf16), steps, the retain weight, the
target (no base, a longer base, width 256, trained in pure bf16) and three seeds, each at eight precisions. A
condition is data: the settings of its target and of its unlearning runs as values.

$ python study/sweep.py                    # -> out/sweep.json, figures/6_when.png, and the headline tables (printed)
$ python study/sweep.py --scale --real out_hf   # the width axis in the erasing regime, beside the real model's study in
                                          # out_hf -> out/scale.json, figures/9_scale.png, and its table
$ python study/sweep.py --headline out_hf,out_hf_s1338,out_hf_s1339   # the real model's headline over those studies
                                          # (one per seed), mean ± sd -> out/headline.json and its table

Each condition is a cached study in out/sweep/<target settings>/<unlearning settings>/ beside a target and retrain
trained once per target settings, so an interrupted sweep resumes where it stopped.
"""
import hashlib
import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as python study/sweep.py: the core is one up
import evaluate  # noqa: E402
from data.prepare import DataConfig  # noqa: E402
from evaluate import logged, plain  # noqa: E402
from figures import law_points, save_png  # noqa: E402
from report import CONSTRAINED, RETAINED, SURE, mean_sd  # noqa: E402
from settings import cli, write_json  # noqa: E402
from train import TrainConfig, train_all  # noqa: E402

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


def scale(widths, lrs=(1e-4, 3e-5), methods=("ga_gdr", "npo_klr")):
    """Is the paper's pattern a matter of scale? The GPT at each width in pure bf16 for 100 steps at each learning
    rate, by default one that unlearns (1e-4) and one where only weights near zero move (3e-5); width 128 is the
    sweep's own target. Two of the four constrained methods by default (GA with the retain loss, NPO with the KL),
    as pure bf16 is slow on a CPU without native bf16 (RESULTS.md, section 4)."""
    return [condition(f"width {w}", "bfloat16", dict(lr=lr, steps=100),
                      {} if w == TrainConfig.n_embd else dict(n_embd=w), methods=methods)
            for lr in lrs for w in widths]  # the first learning rate for every width, then the next


@dataclass
class SweepConfig:
    out_dir: str = "out"  # the conditions go in out_dir/sweep/, the results in out_dir/sweep.json
    fig_dir: str = "figures"  # where figure 6 goes ('' = none)
    precisions: str = "full,int8,rtn4,rtn4_asym,rtn4_g64,gptq4,nf4,fp4"  # every condition's rows
    device: str = "auto"  # 'auto' = cuda if present, else cpu
    workers: int = 0  # worker processes of each study; 0 = one per CPU core up to 4
    scale: bool = False  # the width axis (scale()) instead -> out_dir/scale.json, figure 9 and the scale table
    widths: str = "32,64,128"  # comma list: the GPT's widths on that axis (4 layers, 4 heads; 256 does not memorize)
    lrs: str = "1e-4,3e-5"  # comma list: the learning rates on that axis (pure bf16, 100 steps)
    real: str = ""  # comma list of real-model study directories (their results.json) set beside the widths
    headline: str = ""  # comma list of studies of one setting at several seeds: their headline, mean ± sd, only

    def __post_init__(self):
        heads = TrainConfig.n_head
        if not re.fullmatch(r"\d+(,\d+)*", self.widths) or any(int(w) % heads for w in self.widths.split(",")):
            raise ValueError(f"--widths {self.widths}: give a comma list of widths, each a multiple of {heads} (heads)")
        number = r"(\d+\.?\d*|\.\d+)(e[-+]?\d+)?"
        if not all(re.fullmatch(number, lr) and float(lr) > 0 for lr in self.lrs.split(",")):
            raise ValueError(f"--lrs {self.lrs}: give a comma list of positive learning rates, e.g. 1e-4,3e-5")
        for flag in ("real", "headline"):
            missing = [d for d in getattr(self, flag).split(",") if d and not (Path(d) / "results.json").exists()]
            if missing:
                raise ValueError(f"--{flag}: no results.json in {', '.join(missing)}; run the study there first "
                                 f"(RESULTS.md, section 1)")


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
        got = {p: res["retained"].get(p, {}).get("constrained", {}).get("verbmem_forget") for p in ("full", "rtn4")}
        moved, back, kept = (constrained_mean(res["rows"], k) for k in ("mech_moved", "mech_same_moved", "mech_kept"))
        print(f"[{time.time() - t0:5.0f}s] {i + 1}/{len(conditions)} {c['axis']}: {c['dtype']} "
              f"{c['unlearn'] or 'defaults'}, target {c['train'] or 'defaults'}, seed {c['seed']} | retained VerbMem % "
              + " ".join(
                  f"{p} {'n/a' if v is None else f'{v:.0f}'}" for p, v in got.items())
              + f" | rtn4: moved {moved:.0%}, of them back {back:.0%}, update kept {kept:.2f}", flush=True)
    results = plain(dict(meta=dict(settings=asdict(cfg), precisions=cfg.precisions.split(","),
                                   seconds=round(time.time() - t0, 1), machine=dict(
                                       platform=platform.platform(), cpu_count=os.cpu_count())),
                         headline=headline(conds), conditions=conds))
    if cfg.scale:
        results["points"] = scale_points(conds, [d for d in cfg.real.split(",") if d])
    path = Path(cfg.out_dir) / ("scale.json" if cfg.scale else "sweep.json")
    write_json(path, results)
    (scale_report if cfg.scale else sweep_report)(results)
    if cfg.fig_dir:
        (figure9 if cfg.scale else figure6)(results, cfg.fig_dir)
    print(f"wrote {path} ({results['meta']['seconds']:.0f}s)")
    return results


def constrained_mean(rows, key, precision="rtn4"):
    """The mean over the utility-constrained methods of a statistic of a study's rows (a mechanism one by default)."""
    values = [np.nan if r.get(key) is None else r[key] for r in rows
              if r["model"] in CONSTRAINED and r["precision"] == precision]
    return float(np.mean(values)) if values else np.nan  # nan: not measured at that precision


def scale_points(conds, real_dirs=()):
    """One point per condition of the width axis and per real-model study (its results.json): layers, width and
    learning rate, the mean over the utility-constrained methods of retained and excess-retained VerbMem % at full
    precision (how much unlearning removed) and at rtn4 and fp4, and moved / back / kept at rtn4."""
    studies = [("GPT", c["train"].get("n_layer", TrainConfig.n_layer), c["train"].get("n_embd", TrainConfig.n_embd),
                c["unlearn"], c["rows"]) for c in conds]
    for d in real_dirs:
        res = json.loads((Path(d) / "results.json").read_text())
        args = torch.load(Path(d) / "target.pt", map_location="cpu", mmap=True, weights_only=True)["model_args"]
        hf = json.loads((Path(args["hf_dir"]) / "config.json").read_text())
        lr, steps = next((m["lr"], m["steps"]) for n, m in res["meta"]["methods"].items() if n in CONSTRAINED)
        studies.append((f"{Path(args['hf_dir']).name} ({d}, seed {res['meta']['seed']})", hf["num_hidden_layers"],
                        hf["hidden_size"], dict(lr=lr, steps=steps), res["rows"]))
    return [dict(model=name, layers=layers, width=width, lr=unlearn["lr"], steps=unlearn.get("steps"),
                 **{f"{k}_{p}": constrained_mean(rows, f"{k}_verbmem_forget", p) for k in ("retained", "excess")
                    for p in ("full", "rtn4", "fp4")},
                 **{f"law_{k}_rtn4": law_mean(rows, k) for k in ("retained", "excess")},
                 **{k: constrained_mean(rows, f"mech_{k}") for k in ("moved", "same_moved", "kept")})
            for name, layers, width, unlearn, rows in studies]


def law_mean(rows, share, precision="rtn4"):
    """The recovery law's prediction (figures.law_points) of a share ("retained" or "excess") of VerbMem at
    precision, averaged over the utility-constrained methods."""
    picked = [r for r in rows if r["model"] in (*CONSTRAINED, "target", "retrain") and r["precision"] in ("full",
                                                                                                    precision)]
    points = law_points(dict(rows=picked), share=share)
    return float(np.mean([law for _, law, _ in points])) if points else np.nan


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
        f2 = {m: {k: mean_sd([by[m, "full"][k] for by in rows]) for k in (
            "outliers_low", "outliers_high", "forget_exact", "extraction_top_k", "forget_ma")}
              for m in ("target", *FINDING2, *CONSTRAINED, *SURE) if (m, "full") in rows[0]}
        out[dtype] = dict(seeds=[c["seed"] for c in seeds], retained=ret, finding2=f2)
    return out


def sweep_report(results):
    """The headline over seeds as markdown tables: retained % per precision for each reference, and finding 2."""
    ms = lambda v, scale=1, f=".1f": "n/a" if v is None else f"{scale * v[0]:{f}} ± {scale * v[1]:{f}}"
    for dtype, h in results["headline"].items():
        groups = list(h["retained"]["full"])
        label = dict(verbmem_forget="VerbMem", knowmem_forget="KnowMem", forget_exact="exact")
        print(f"\nretained % ({dtype} reference, seeds {h['seeds']}, mean ± sd)\n\n| precision | " + " | ".join(
            f"{g} {label[k]}" for g in groups for k in RETAINED) + " |\n" + "|---" * (1 + 3 * len(groups)) + "|")
        for p, r in h["retained"].items():
            print(f"| {p} | " + " | ".join(ms(r[g][k]) for g in groups for k in RETAINED) + " |")
        print("\n| method (full) | MA ≤ 0.15 | MA ≥ 0.60 | extracted % | top-10 extracted % | mean MA |\n"
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
    rec = lambda c, p: ret(c, p) - ret(c, "full")
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
        for p, color in (("full", "tab:blue"), ("rtn4", "tab:red")):
            axes[0, 2].plot([lr for lr, _ in grid[d]], [ret(c, p) for _, c in grid[d]], marker="o", ls=ls,
                            color=color, label=f"{d}, {'full precision' if p == 'full' else p}")
        for key, marker, color, what in (
                ("mech_moved", "o", "tab:green", "share of weights moved"),
                ("mech_same_moved", "s", "tab:purple", "moved ones back on the target's rtn4 code"),
                ("mech_kept", "^", "tab:orange", "update kept by rounding, ⟨Q(θ_u) − Q(θ_o), δ⟩ / |δ|²")):
            axes[1, 0].plot([lr for lr, _ in grid[d]], [constrained_mean(c["rows"], key) for _, c in grid[d]], marker=marker,
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
    shown, bars = ["full", "int8", *FOUR_BIT], []
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


def study_headline(rows, precisions):
    """One study's headline per precision: the target's VerbMem and exact %, the retrain model's VerbMem, and over
    the utility-constrained methods their VerbMem, excess retained VerbMem %, PrivLeak and kept; the same for SURE's
    NPO_KLR where it ran (None where not)."""
    by = {(r["model"], r["precision"]): r for r in rows}
    sure = lambda p, k: by[("npo_klr_sure", p)][k] if ("npo_klr_sure", p) in by else None
    return {p: dict(target_verbmem=by["target", p]["verbmem_forget"], target_exact=100 * by["target", p]["forget_exact"],
                    retrain_verbmem=by["retrain", p]["verbmem_forget"], verbmem=constrained_mean(rows, "verbmem_forget", p),
                    gap=by["target", p]["verbmem_forget"] - by["retrain", p]["verbmem_forget"],
                    excess=constrained_mean(rows, "excess_verbmem_forget", p), privleak=constrained_mean(rows, "privleak", p),
                    kept=constrained_mean(rows, "mech_kept", p), sure_excess=sure(p, "excess_verbmem_forget"),
                    sure_privleak=sure(p, "privleak")) for p in precisions}


def headline_over(dirs):
    """The headline of several studies of one setting (one per seed) at the precisions they all measured: each
    number's mean ± sample sd over the studies (mean_sd; None where a study lacks it). Writes nothing."""
    studies = [json.loads((Path(d) / "results.json").read_text()) for d in dirs]
    precisions = [p for p in studies[0]["meta"]["precisions"] if all(p in s["meta"]["precisions"] for s in studies)]
    each = [study_headline(s["rows"], precisions) for s in studies]
    nan = lambda v: v is None or np.isnan(v)
    return dict(studies=[str(d) for d in dirs], seeds=[s["meta"]["seed"] for s in studies], headline={
        p: {k: mean_sd([None if nan(h[p][k]) else h[p][k] for h in each]) for k in each[0][p]} for p in precisions})


def headline_report(res):
    """headline_over's result as RESULTS.md's markdown table."""
    f = lambda v, fmt=".1f": "n/a" if v is None else f"{v[0]:{fmt}} ± {v[1]:{fmt}}"
    cols = ("target_verbmem", "target_exact", "retrain_verbmem", "verbmem", "gap", "excess", "privleak",
            "sure_excess", "sure_privleak", "kept")
    print(f"\nheadline over {', '.join(res['studies'])} (seeds {res['seeds']}), mean ± sample sd\n\n| precision | "
          "target VerbMem | target exact % | retrain VerbMem | constrained VerbMem | gap (target − retrain) | "
          "excess retained % | PrivLeak | npo_klr_sure excess % | its PrivLeak | kept |\n" + "|---" * 11 + "|")
    for p, h in res["headline"].items():
        print(f"| {p} | " + " | ".join(f(h[k], ".2f" if k == "kept" else ".1f") for k in cols) + " |")


def scale_report(results):
    """The width axis beside the real model as a markdown table (utility-constrained methods averaged)."""
    f = lambda v, fmt=".0f": "n/a" if v is None or np.isnan(v) else f"{v:{fmt}}"
    print("\n| model | layers × width | lr, steps | moved | back | kept (rtn4) | retained VerbMem % full | rtn4 | "
          "rtn4, law | fp4 | excess % full | rtn4 | rtn4, law | fp4 |\n" + "|---" * 14 + "|")
    for q in results["points"]:
        print(f"| {q['model']} | {q['layers']} × {q['width']} | {q['lr']:g}, {q['steps']} | {f(100 * q['moved'])}% | "
              f"{f(100 * q['same_moved'])}% | {f(q['kept'], '.2f')} | " + " | ".join(
                  f(q[c]) for k in ("retained", "excess") for c in (f"{k}_full", f"{k}_rtn4", f"law_{k}_rtn4",
                                                                      f"{k}_fp4")) + " |")


def figure9(results, fig_dir="figures"):
    """Figure 9 from a scale dict (out/scale.json): against the width, per learning rate, what survives rounding
    (kept at rtn4), how much unlearning removed at full precision, and what 4-bit rounding brought back; the real
    models' studies as stars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = results["points"]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5), layout="constrained")
    panels = (("update kept by rtn4 rounding (kept)", lambda q: q["kept"]),
              ("retained VerbMem % at full precision (lower: more unlearned)", lambda q: q["retained_full"]),
              ("recovery at rtn4: retained VerbMem %, rtn4 − full", lambda q: q["retained_rtn4"] - q["retained_full"]))
    for i, lr in enumerate(sorted({q["lr"] for q in pts})):
        gpt = sorted((q for q in pts if q["lr"] == lr and q["model"] == "GPT"), key=lambda q: q["width"])
        real = [q for q in pts if q["lr"] == lr and q["model"] != "GPT"]
        for ax, (_, y) in zip(axes, panels):
            ax.plot([q["width"] for q in gpt], [y(q) for q in gpt], marker="o", color=plt.cm.tab10(i),
                    label=f"GPT (4 layers), lr {lr:g}")
            ax.scatter([q["width"] for q in real], [y(q) for q in real], marker="*", s=160, color=plt.cm.tab10(i),
                       edgecolor="black", label=f"pretrained (real), lr {lr:g}" if real else None)
    for ax, (ylabel, _), ylim in zip(axes, panels, ((0, 1.1), (0, 105), (-10, 70))):
        ax.set(xscale="log", xlabel="width (n_embd / hidden_size)", ylabel=ylabel, ylim=ylim)
        ax.axhline(1 if ax is axes[0] else 0, color="grey", lw=0.6)
    axes[2].axhline(PAPER_RECOVERY, color="grey", ls=":", label="the paper: 21% → 83%")
    axes[0].legend(fontsize=8)
    axes[2].legend(fontsize=8)
    fig.suptitle("9. Is the paper's pattern a matter of scale? Pure bf16 unlearning, utility-constrained methods averaged")
    return save_png(fig, Path(fig_dir) / "9_scale.png")


if __name__ == "__main__":
    cfg, = cli(__doc__, SweepConfig)
    if cfg.headline:
        result = headline_over(cfg.headline.split(","))
        write_json(Path(cfg.out_dir) / "headline.json", result)
        headline_report(result)
    else:
        sweep(cfg, scale([int(w) for w in cfg.widths.split(",")], [float(lr) for lr in cfg.lrs.split(",")])
              if cfg.scale else SWEEP)
