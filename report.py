"""
The study's arithmetic on its rows, and its printed tables: what compares an unlearned model with the target and
the retrain model at the same precision (retained %, excess, the share that came back, PrivLeak), each forget
sequence's fate under rounding (finding 2 on finding 1's axis), and the mean ± sd over seeds.
"""
import numpy as np
import torch

import metrics

CONSTRAINED = ("ga_gdr", "ga_klr", "npo_gdr", "npo_klr")  # the utility-constrained methods of the 21% -> 83%
SURE = tuple(m + "_sure" for m in CONSTRAINED)  # the same with SURE, the paper's fix, averaged on their own
RETAINED = ("verbmem_forget", "knowmem_forget", "forget_exact")  # retained % is reported for these


def relative(rows, precisions):
    """Adds what compares models at the same precision p: PrivLeak against this run's retrain model at p (its AUC
    moves with quantization too, so the unlearned model is held to the gold standard under the same rounding; the
    paper's code hard-codes one full-precision AUC), retained % against the target at p, and retained % of the
    target's excess over the retrain model at p (metrics.excess_retained, beside the gap it divides by, gap_*; not read
    where the gap is under metrics.EXCESS_FLOOR of the target's metric). Returns both averaged over the
    utility-constrained methods, and over their SURE versions, per precision. Also the share of what unlearning took
    that came back at p (metrics.recovered_share, against the target at p), recovered_*, and the mean `kept`."""
    by = {(r["model"], r["precision"]): r for r in rows}
    for r in rows:
        target, retrain = by["target", r["precision"]], by["retrain", r["precision"]]
        r["privleak"] = metrics.privleak(r["mia_auc"], retrain["mia_auc"])
        r.update({f"retained_{k}": metrics.retained_pct(r[k], target[k]) for k in RETAINED})
        r.update({f"excess_{k}": metrics.excess_retained(r[k], target[k], retrain[k]) for k in RETAINED})
        r.update({f"gap_{k}": target[k] - retrain[k] for k in RETAINED})  # what excess_* divides by
        r.update({f"recovered_{k}": metrics.recovered_share(r[k], by[r["model"], "full"][k], target[k])
                  for k in RETAINED})
    mean = lambda v: torch.tensor(v, dtype=torch.float64).nanmean().item()
    summary = {}
    for p in precisions:
        for group, members in (("constrained", CONSTRAINED), ("sure", SURE)):
            rs = [by[m, p] for m in members if (m, p) in by]
            if rs:
                summary.setdefault(p, {})[group] = dict(
                    methods=[r["model"] for r in rs], **{k: mean([r[f"retained_{k}"] for r in rs]) for k in RETAINED},
                    **{f"{d}_{k}": mean([r[f"{d}_{k}"] for r in rs]) for d in ("excess", "recovered")
                       for k in RETAINED},
                    kept=mean([r.get("mech_kept", float("nan")) for r in rs]))
    return summary


SEQ_GROUPS = {(0, 1): "came_back", (1, 1): "stayed", (0, 0): "forgotten", (1, 0): "lost"}  # (extracted at full
# precision, extracted after quantization) -> the sequence's group


def per_sequence(rows, precisions):
    """Finding 2 on finding 1's axis: per quantized precision p and utility-constrained method, the forget sequences
    that came back (greedy extraction fails at full precision and succeeds at p), stayed (succeeds at both), stayed
    forgotten, or were lost to the rounding, each group with its size and mean MA in the target (how memorized the
    sequences were before unlearning) and in the unlearned model at full precision (what unlearning left)."""
    by = {(r["model"], r["precision"]): r for r in rows}
    target_ma, res = by["target", "full"]["forget_ma_seq"], {}
    for p in precisions[1:]:
        for m in CONSTRAINED:
            if (m, p) not in by:
                continue
            full, q = by[m, "full"], by[m, p]
            seqs = {g: [] for g in SEQ_GROUPS.values()}
            for i, ab in enumerate(zip(full["forget_exact_seq"], q["forget_exact_seq"])):
                seqs[SEQ_GROUPS[ab]].append(i)
            res.setdefault(p, {})[m] = {g: dict(
                n=len(ix), seqs=ix, target_ma=float(np.mean([target_ma[i] for i in ix])) if ix else None,
                unlearned_ma=float(np.mean([full["forget_ma_seq"][i] for i in ix])) if ix else None)
                for g, ix in seqs.items()}
    return res


def pooled_sequences(runs):
    """per_sequence over seeds: each group's sequences counted over the seeds, its MAs averaged over them."""
    res = {}
    for p, methods in runs[0]["per_sequence"].items():
        for m in methods:
            for g in SEQ_GROUPS.values():
                gs = [run["per_sequence"][p][m][g] for run in runs]
                n = sum(x["n"] for x in gs)
                res.setdefault(p, {}).setdefault(m, {})[g] = dict(n=n, **{k: sum(
                    x[k] * x["n"] for x in gs if x["n"]) / n if n else None for k in ("target_ma", "unlearned_ma")})
    return res


def mean_sd(values):
    """[mean, sample standard deviation] of a list of numbers (sd 0 for one number); None if any is missing."""
    if any(v is None for v in values):
        return None
    return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]


def report(results):
    """The paper's Table 1 layout (Zhang et al. 2024, Table 1) at full precision and the first 4-bit one, then the
    retained summary. A number is a float, or [mean, sd] over seeds (out/seeds.json)."""
    rows, precs, matched = results["rows"], results["meta"]["precisions"], results["meta"].get("damage_matched")
    shown = ["full"] + [p for p in precs if p.endswith("4")][:1] + ([matched] if isinstance(matched, str) else [])

    def fmt(v, scale=1, digits=1):
        if v is None or isinstance(v, list) and None in v:  # not read (nan; over seeds, nan at some seed)
            return f"{'n/a':>12}"
        return f"{scale * v[0]:7.{digits}f} ±{scale * v[1]:4.{digits}f}" if isinstance(v, list) else \
            f"{scale * v:12.{digits}f}"
    print(f"full precision: the unquantized models, {results['meta']['settings']['dtype']} weights")
    print(f"{'model':<14}{'precision':<10}" + "".join(f"{h:>12}" for h in (
        "VerbMem", "KnowMem", "PrivLeak", "KnowMem-ret", "exact %", "ppl")))
    for r in rows:
        if r["precision"] in shown:
            print(f"{r['model']:<14}{r['precision']:<10}" + "".join(fmt(r[k]) for k in (
                "verbmem_forget", "knowmem_forget", "privleak", "knowmem_retain")) +
                  fmt(r["forget_exact"], 100) + fmt(r["holdout_ppl"]))
    by = {(r["model"], r["precision"]): r for r in rows}
    print("\nper precision (Table 2's reading): the target's own damage (VM = VerbMem, exact %), then the methods' "
          "mean retained % (ret, of the target at that precision), recovered % (rec, of what unlearning took: "
          "metrics.recovered_share), excess VerbMem % (exc, of the target's lead over retrain) and kept")
    print(f"{'precision':<14}{'group':<13}" + "".join(f"{h:>12}" for h in (
        "target VM", "tgt exact", "VM ret", "exact ret", "VM rec", "exact rec", "VM exc", "kept")))
    for p, groups in results["retained"].items():
        damage = fmt(by["target", p]["verbmem_forget"]) + fmt(by["target", p]["forget_exact"], 100)
        for g, v in groups.items():
            print(f"{p:<14}{g:<13}{damage}" + "".join(fmt(v.get(k)) for k in (
                "verbmem_forget", "forget_exact", "recovered_verbmem_forget", "recovered_forget_exact",
                "excess_verbmem_forget")) + fmt(v.get("kept"), digits=2))
    ma = lambda x: f" (MA target {x['target_ma']:.2f}, unlearned {x['unlearned_ma']:.2f})" if x["n"] else ""
    for p, methods in results.get("per_sequence", {}).items():
        print(f"forget sequences at {p}: " + " | ".join(f"{m}: " + ", ".join(
            f"{g} {x['n']}{ma(x)}" for g, x in groups.items()) for m, groups in methods.items()))
    print(f"damage-matched precision (the target keeps >= {100 * metrics.PAPER_KEEP:.1f}% of its full-precision "
          f"VerbMem, and the least such, as the paper's 7B at 4 bits): {matched or 'none'}")
