"""
Unlearning by task arithmetic: fine-tune on the forget set, then subtract what the fine-tuning added.

$ python task_arithmetic.py               # ta:  tau = theta_ft - theta_o from CE fine-tuning on D_f; theta_o - lam*tau
$ python task_arithmetic.py --lam 2       # a stronger negation
$ python task_arithmetic.py --tau         # tau: SGA until mean MA(D_f) < phi, snapshot theta_0, fine-tune from it on
                                          #      D_f, stop as soon as theta_0 - (theta_ft - theta_0) is at holdout MA
$ python task_arithmetic.py --dtype bfloat16

TA: Ilharco et al. 2023, "Editing Models with Task Arithmetic". TAU: Barbulescu & Triantafillou 2024, "To Each
(Textual Sequence) Its Own" (ICML), which stops each method at the memorization level of unseen text.
Reads out/target.pt (trains it first if it is missing) and writes out/<ta|tau>.pt and out/<ta|tau>.json.
"""
import copy
from dataclasses import dataclass

import torch

from model import score
from settings import check_range, cli
from unlearn import UnlearnConfig, ce_loss, load_target, save_result, unlearn
from unlearn_ga import ga_loss, sga_pick

# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TAConfig:
    lam: float = 4.0  # TA: the result is theta_o - lam * tau (a few dozen fine-tuning steps make a short tau)
    tau: bool = False  # run TAU instead of TA
    phi: float = 0.5  # TAU: its SGA phase runs until mean MA(D_f) < phi
    sga_gamma: float = 0.70  # TAU: the SGA phase ascends on sequences with MA >= sga_gamma (+ the most memorized)

    def __post_init__(self):
        check_range(self, lam=">= 0", phi="0..1", sga_gamma="0..1")
# ----------------------------------------------------------------------------------------------------------------


def task_vector(a, b):
    """tau = a - b for two state dicts with the same keys, in float32."""
    if a.keys() != b.keys():
        raise ValueError(f"state dicts differ: {sorted(a.keys() ^ b.keys())[:5]}")
    return {k: a[k].float() - b[k].float() for k in a}


def apply(theta, tau, lam):
    """theta + lam * tau, tensor by tensor, computed in float32 and stored in theta's dtype. Negation is lam < 0:
    TA returns apply(theta_o, tau, -lam); lam = 0 returns theta exactly."""
    return {k: (v.float() + lam * tau[k]).to(v.dtype) for k, v in theta.items()}


SETTINGS = (UnlearnConfig, TAConfig)  # evaluate.py keys its cache on their values


def main(argv=None):
    cfg, tcfg = cli(__doc__, *SETTINGS, argv=argv)
    model, data = load_target(cfg)
    if not tcfg.tau:
        theta_o = model.state_dict()  # model itself is never trained: the fine-tuning runs on a copy
        ft, stats = unlearn(copy.deepcopy(model), data, ce_loss, cfg)
        model.load_state_dict(apply(theta_o, task_vector(ft.state_dict(), theta_o), -tcfg.lam))
    else:
        level = score(model, data.split("holdout"))["ma"].mean().item()
        print(f"tau: SGA until mean MA(D_f) < phi {tcfg.phi}, then negated fine-tuning until < holdout MA {level:.3f}")
        model, sga = unlearn(model, data, ga_loss, cfg, pick=sga_pick(tcfg.phi, tcfg.sga_gamma))
        theta_0, probe = model.state_dict(), copy.deepcopy(model)

        def pick(ft, forget):  # probe = theta_0 - (theta_ft - theta_0), measured before every fine-tuning step
            probe.load_state_dict(apply(theta_0, task_vector(ft.state_dict(), theta_0), -1.0))
            return None if score(probe, forget)["ma"].mean() < level else torch.arange(len(forget))

        _, ft = unlearn(copy.deepcopy(model), data, ce_loss, cfg, pick=pick)
        model = probe
        stats = dict(steps=sga["steps"] + ft["steps"], seconds=round(sga["seconds"] + ft["seconds"], 2),
                     sga_steps=sga["steps"], sga_stopped=sga["stopped"], ft_steps=ft["steps"], stopped=ft["stopped"],
                     lr=cfg.lr)
    return save_result("tau" if tcfg.tau else "ta", model, data, stats, cfg, tcfg)


if __name__ == "__main__":
    main()
