"""
Unlearning by gradient ascent on the forget set (GA; Jang et al. 2023), with the utility terms and SURE of unlearn.py,
and Selective Gradient Ascent (SGA; Barbulescu & Triantafillou 2024, "To Each (Textual Sequence) Its Own", ICML).

$ python unlearn_ga.py                          # ga:          minimize -CE(D_f)
$ python unlearn_ga.py --retain gdr             # ga_gdr:      + alpha * CE(D_r)
$ python unlearn_ga.py --retain klr             # ga_klr:      + alpha * KL(pi_ref || pi_theta) on D_r
$ python unlearn_ga.py --retain gdr --sure      # ga_gdr_sure: only the most salient weight matrices move, lr x10
$ python unlearn_ga.py --selective              # sga:         ascend only on the sequences still memorized
$ python unlearn_ga.py --dtype bfloat16         # pure bf16 weights and AdamW state, no float32 master copy

Reads out/target.pt (trains it first if it is missing) and writes out/<method>.pt and out/<method>.json.
"""
from dataclasses import dataclass

from model import score
from settings import check_range, cli
from unlearn import RetainConfig, UnlearnConfig, ce_loss, load_target, method_name, save_result, unlearn

# ----------------------------------------------------------------------------------------------------------------
@dataclass
class SGAConfig:
    selective: bool = False  # SGA: each step ascend only on sequences with MA >= sga_gamma (+ the most memorized)
    sga_gamma: float = 0.70  # MA above which a sequence counts as still memorized

    def __post_init__(self):
        check_range(self, sga_gamma="0..1")
# ----------------------------------------------------------------------------------------------------------------


def ga_loss(model, seqs):
    """GA: L = -CE(D_f). Minimizing it ascends the forget set's language-modelling loss (Jang et al. 2023)."""
    return -ce_loss(model, seqs)


def sga_select(ma, gamma=0.70):
    """SGA (Barbulescu & Triantafillou 2024): the indices of the sequences with MA >= gamma, plus the single most
    memorized one, so that every step has something to ascend on."""
    keep = ma >= gamma
    keep[ma.argmax()] = True
    return keep.nonzero().flatten()


def sga_pick(level, gamma):
    """The SGA schedule for unlearn(): recompute MA(D_f) each step; stop once its mean falls below `level`."""
    def pick(model, forget):
        ma = score(model, forget)["ma"]
        return None if ma.mean() < level else sga_select(ma, gamma)
    return pick


SETTINGS = (UnlearnConfig, RetainConfig, SGAConfig)  # evaluate.py keys its cache on their values


def main(argv=None):
    cfg, rcfg, scfg = cli(__doc__, *SETTINGS, argv=argv)
    if scfg.selective and (rcfg.retain != "none" or rcfg.sure):
        raise SystemExit("--selective is plain SGA: drop --retain/--sure")
    method = "sga" if scfg.selective else method_name("ga", rcfg)
    model, data = load_target(cfg)
    pick = None
    if scfg.selective:  # the unseen-text level, measured on the holdout with the target weights
        level = score(model, data.split("holdout"))["ma"].mean().item()
        print(f"sga: ascending until mean MA(D_f) < holdout MA {level:.3f}")
        pick = sga_pick(level, scfg.sga_gamma)
    model, stats = unlearn(model, data, ga_loss, cfg, rcfg, pick=pick)
    return save_result(method, model, data, stats, cfg, rcfg, scfg)


if __name__ == "__main__":
    main()
