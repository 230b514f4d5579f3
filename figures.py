"""
The study's figures 1-5, drawn from a results dict (out/results.json) alone, each written atomically:
  1 forget VerbMem and KnowMem per precision    2 retained knowledge %, full precision vs 4-bit
  3 forget quality against utility              4 memorization accuracy per sequence, with finding 2's bands
  5 the mechanism: |δ|/Δ and the share of moved weights that round back
  7 the durability card (with evaluate.py --durability): relearning curves, Q and R per model
  8 the recovery law (metrics.predicted_retained) against the measured recovery, over any number of studies

$ python figures.py                  # redraws figures/1-5 (and 7) from out/results.json
$ python figures.py --law out out/seed_1338 out_hf   # figure 8 over those studies' results.json, with its errors
"""
import io
import json
import sys
from pathlib import Path

import numpy as np

import metrics
from settings import atomic_write_bytes
from unlearn import METHODS


def save_png(fig, path):
    """Writes a matplotlib figure to path as a PNG, atomically, and closes it; returns the path."""
    import matplotlib.pyplot as plt  # the callers have chosen the Agg backend
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def figures(results, fig_dir="figures"):
    """Draws the figures into fig_dir, each written atomically; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, precs, models = results["rows"], results["meta"]["precisions"], results["meta"]["models"]
    by = {(r["model"], r["precision"]): r for r in rows}
    val = lambda m, p, k: np.nan if by[m, p].get(k) is None else by[m, p][k]
    methods = [m for m in models if m in METHODS]
    color = {"target": "black", "retrain": "grey", **{m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}}
    low = next((p for p in precs if p.endswith("4")), precs[-1])  # the 4-bit precision of figures 3 and 4
    both, paths = list(dict.fromkeys(["full", low])), []

    def save(fig, name):
        paths.append(save_png(fig, Path(fig_dir) / name))

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5), layout="constrained")  # 1. recovery curves
    for ax, k, title in zip(axes, ("verbmem_forget", "knowmem_forget"), ("VerbMem on D_f", "KnowMem on D_f")):
        for m in models:
            ax.plot(precs, [val(m, p, k) for p in precs], marker="o", color=color[m], label=m,
                    lw=2.5 if m in ("target", "retrain") else 1.2, ls="--" if m == "retrain" else "-")
        ax.set(title=title, xlabel="precision", ylabel="ROUGE-L F1 × 100")
    axes[1].legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.suptitle("1. Does quantization bring the forgotten text back?")
    save(fig, "1_recovery.png")

    shown = [p for p in precs if p == "full" or p.endswith("4")]  # 2. retained %, full precision vs 4-bit
    groups = methods + [g for g in ("constrained", "sure") if any(g in results["retained"].get(p, {}) for p in shown)]
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.9 * len(groups)), 7), sharex=True, layout="constrained")
    x, w = np.arange(len(groups)), 0.8 / len(shown)
    for ax, k in zip(axes, ("verbmem_forget", "knowmem_forget")):
        for j, p in enumerate(shown):
            mean = results["retained"].get(p, {})
            ys = [val(m, p, f"retained_{k}") for m in methods] + [
                np.nan if mean.get(g, {}).get(k) is None else mean[g][k] for g in groups[len(methods):]]
            ax.bar(x + (j - (len(shown) - 1) / 2) * w, ys, w, label=p)
        ax.axhline(100, color="black", lw=0.6)
        ax.set(ylabel=f"retained {k.split('_')[0]} %")
    axes[0].legend(fontsize=8, ncol=len(shown))
    label = {"constrained": "mean of *_gdr, *_klr", "sure": "mean of *_sure"}
    axes[1].set_xticks(x, [label.get(g, g) for g in groups], rotation=35, ha="right")
    fig.suptitle("2. Retained knowledge: metric(unlearned, p) / metric(target, p) × 100")
    save(fig, "2_retained.png")

    fig, axes = plt.subplots(1, len(both), figsize=(6.5 * len(both), 4.8), squeeze=False,
                             layout="constrained")  # 3. forget quality against utility
    for ax, p in zip(axes[0], both):
        for m in models:
            xy = val(m, p, "knowmem_retain"), val(m, p, "verbmem_forget")
            ax.scatter(*xy, color=color[m], marker="*" if m in ("target", "retrain") else "o", s=60)
            ax.annotate(m, xy, fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set(title=p, xlabel="KnowMem on D_r (utility: higher is better)",
               ylabel="VerbMem on D_f (forgetting: lower is better)")
    fig.suptitle("3. Forget quality against utility")
    save(fig, "3_forget_vs_utility.png")

    rng = np.random.default_rng(0)  # 4. per-sequence MA, with the fixed outlier bands of finding 2
    fig, axes = plt.subplots(len(both), 1, figsize=(max(8.0, 0.6 * len(models) + 2), 3.8 * len(both)),
                             squeeze=False, layout="constrained")
    for ax, p in zip(axes[:, 0], both):
        cols = [("holdout\n(target)", by["target", p]["holdout_ma_seq"])] + [(m, by[m, p]["forget_ma_seq"])
                                                                               for m in models]
        ax.axhspan(0, 0.15, color="tab:red", alpha=0.12, label="MA ≤ 0.15: over-unlearned")
        ax.axhspan(0.60, 1.02, color="tab:blue", alpha=0.08, label="MA ≥ 0.60: still memorized")
        for i, (m, ma) in enumerate(cols):
            ax.scatter(i + rng.uniform(-0.25, 0.25, len(ma)), ma, s=7, color=color.get(m, "tab:green"), alpha=0.7)
            ax.hlines(np.mean(ma), i - 0.35, i + 0.35, color="black")
        ax.set_xticks(range(len(cols)), [c[0] for c in cols], rotation=35, ha="right", fontsize=8)
        ax.set(ylim=(-0.02, 1.02), ylabel="MA per forget sequence", title=f"{p} (bar: mean)")
    axes[0, 0].legend(fontsize=7, loc="lower left")
    fig.suptitle("4. Memorization accuracy per sequence")
    save(fig, "4_ma_distributions.png")

    mech = [p for p in precs if any(by[m, p].get("mech_hist") for m in methods)]  # 5. the mechanism
    if mech:
        hp = low if low in mech else mech[0]
        fig, axes = plt.subplots(1, 2, figsize=(14, 4.5), layout="constrained")
        edges = ["0", "1/8", "1/4", "1/2", "1", "2", "∞"]
        bins = [f"[{a}, {b})" for a, b in zip(edges, edges[1:])]
        for m in methods:
            share = [h or np.nan for h in by[m, hp]["mech_hist"]]  # empty bins left out of the log scale
            axes[0].plot(bins, share, marker="o", color=color[m], label=m)
        axes[0].set(yscale="log", xlabel=f"|δ| / Δ at {hp} (δ = θ_u − θ_o, Δ the target's step)",
                    ylabel="share of quantized weights")
        axes[0].legend(fontsize=7, ncol=2)
        x, w = np.arange(len(methods)), 0.8 / len(mech)
        for j, p in enumerate(mech):
            axes[1].bar(x + (j - (len(mech) - 1) / 2) * w, [val(m, p, "mech_same_moved") for m in methods], w, label=p)
        axes[1].set_xticks(x, methods, rotation=35, ha="right")
        axes[1].set(ylim=(0, 1), ylabel="moved weights that round back\nto the target's code")
        axes[1].legend(fontsize=8)
        fig.suptitle("5. Do the unlearning updates survive rounding?")
        save(fig, "5_mechanism.png")
    if "durability" in results:
        paths.append(figure7(results["durability"], models, color, fig_dir))
    return paths


def figure7(dur, models, color, fig_dir="figures"):
    """The durability card (evaluate.py --durability): forget VerbMem of the half no attack trains on against the
    relearning steps k, one panel per attack; then Q (4-bit) and R (one epoch of relearning, against retrain) per
    model (durability.robustness, durability.relearn_robustness)."""
    import matplotlib.pyplot as plt
    attacks = list(next(iter(dur["curves"].values())))
    fig, axes = plt.subplots(1, len(attacks) + 1, figsize=(6 * (len(attacks) + 1), 4.8), layout="constrained")
    for ax, a in zip(axes, attacks):
        for m in models:
            curve = dur["curves"][m][a]
            ks = sorted(curve, key=int)
            ax.plot([int(k) + 1 for k in ks], [curve[k]["verbmem_forget"] for k in ks], marker="o", color=color[m],
                    lw=2.5 if m in ("target", "retrain") else 1.2, ls="--" if m == "retrain" else "-", label=m)
        ax.set(xscale="log", xlabel="relearning steps k + 1", ylabel="VerbMem on the held-out half of D_f",
               title=f"attack: {a}")
    axes[0].legend(fontsize=7, ncol=2)
    scores = [k for k in next(iter(dur["card"].values())) if k.startswith(("Q_", "R_"))]
    x, w = np.arange(len(models)), 0.8 / len(scores)
    for j, k in enumerate(scores):
        axes[-1].bar(x + (j - (len(scores) - 1) / 2) * w, [dur["card"][m][k] for m in models], w, label=k)
    axes[-1].set_xticks(x, models, rotation=45, ha="right", fontsize=8)
    axes[-1].set(ylim=(0, 1.05), ylabel="1 = VerbMem moves as its control (Q: not at all, R: as retrain's)",
                 title="Q and R of VerbMem")
    axes[-1].legend(fontsize=7, ncol=2)
    fig.suptitle("7. Does the unlearning survive relearning and quantization?")
    return save_png(fig, Path(fig_dir) / "7_durability.png")


def law_points(results, metric="verbmem_forget", share="retained"):
    """(measured, predicted, null) share of metric for every unlearned model at every quantizer the mechanism was
    measured at: the law (metrics.predicted_retained from its full-precision row, kept, and the target's, or for
    the excess the target-retrain gap's, change under the quantizer) and the null law "quantization changes
    nothing" (its full-precision value). share: "retained" (% of the target at p) or "excess" (% of the target's
    excess over the retrain model at p); rows where it is undefined are left out."""
    by, k = {(r["model"], r["precision"]): r for r in results["rows"]}, f"{share}_{metric}"

    def scale(p):  # m_t / m_t,q, or the gap's ratio for the excess
        lead = lambda q: by["target", q][metric] - (by["retrain", q][metric] if share == "excess" else 0)
        return lead("full") / lead(p) if lead(p) else None
    return [(r[k], metrics.predicted_retained(by[r["model"], "full"][k], r["mech_kept"], scale(r["precision"])),
             by[r["model"], "full"][k]) for r in results["rows"]
            if r.get("mech_kept") is not None and r.get(k) is not None and by[r["model"], "full"].get(k) is not None
            and scale(r["precision"]) is not None]


def figure8(studies, fig_dir="figures"):
    """The law tested: measured against predicted VerbMem share, one colour per study ({label: results}), beside
    the same against the null law; top row retained %, bottom row excess retained %. Returns the path and
    {label: {share: (n, mean |error| of the law, of the null)}}."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(11, 10), layout="constrained")
    fit, lim = {}, dict(retained=(0, 110), excess=(-160, 110))
    for row, share in zip(axes, ("retained", "excess")):
        for i, (label, res) in enumerate(studies.items()):
            pts = np.array(law_points(res, share=share)).reshape(-1, 3)
            if not len(pts):
                continue
            fit.setdefault(label, {})[share] = (len(pts), *(float(np.abs(pts[:, 0] - pts[:, j]).mean())
                                                             for j in (1, 2)))
            for ax, j in zip(row, (1, 2)):
                ax.scatter(pts[:, j], pts[:, 0], s=14, color=plt.cm.tab10(i % 10), label=f"{label} ({len(pts)})",
                           alpha=0.7)
        name = "retained VerbMem %" if share == "retained" else "excess retained VerbMem % (0 = retrain)"
        for ax, law in zip(row, ("law: 100 − kept · (100 − at full precision) · scale", "null: as at full precision")):
            ax.plot(lim[share], lim[share], color="grey", lw=1)
            ax.set(xlabel=f"predicted, {law}", xlim=lim[share], ylim=lim[share])
        row[0].set(ylabel=f"measured {name} after quantization")
    axes[0, 0].legend(fontsize=8)
    fig.suptitle("8. Does kept, read off the weights alone, predict what quantization brings back?")
    return save_png(fig, Path(fig_dir) / "8_law.png"), fit


def read_results(path):
    """The results dict in path (a results.json, or a study's directory holding one), refused clearly if absent."""
    path = Path(path)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise SystemExit(f"{path}: no results.json there; `python evaluate.py` writes out/results.json\n{__doc__}")
    return json.loads(path.read_text())


if __name__ == "__main__":
    if sys.argv[1:2] in (["-h"], ["--help"]):
        print(__doc__)
    elif sys.argv[1:2] == ["--law"]:  # python figures.py --law DIR [DIR ...]: figure 8 over the studies in DIRs
        path, fit = figure8({d: read_results(d) for d in sys.argv[2:]})
        for label, shares in fit.items():
            for share, (n, law, null) in shares.items():
                print(f"{label}, {share} %: {n} points, mean |measured - predicted| {law:.2f} points (law), "
                      f"{null:.2f} (null)")
        print(f"wrote {path}")
    else:
        figures(read_results(sys.argv[1] if len(sys.argv) > 1 else "out/results.json"))
