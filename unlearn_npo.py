"""
Unlearning by Negative Preference Optimization (NPO; Zhang et al. 2024, arXiv 2404.05868), with the same loop,
retain terms and SURE switch as unlearn_ga.py (unlearn.py holds them).

$ python unlearn_npo.py                          # npo
$ python unlearn_npo.py --retain gdr             # npo_gdr:      + alpha * CE(D_r)
$ python unlearn_npo.py --retain klr             # npo_klr:      + alpha * KL(pi_ref || pi_theta) on D_r
$ python unlearn_npo.py --retain klr --sure      # npo_klr_sure: only the most salient weight matrices move, lr x10
$ python unlearn_npo.py --dtype bfloat16         # pure bf16 weights and AdamW state, no float32 master copy

Reads out/target.pt (trains it first if it is missing) and writes out/<method>.pt and out/<method>.json.
"""
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from settings import check_range, cli
from unlearn import RetainConfig, UnlearnConfig, load_target, method_name, save_result, unlearn, xy

# ----------------------------------------------------------------------------------------------------------------
@dataclass
class NPOConfig:
    beta: float = 0.1  # inverse temperature; as beta -> 0 NPO's gradient tends to GA's

    def __post_init__(self):
        check_range(self, beta="> 0")
# ----------------------------------------------------------------------------------------------------------------


def seq_logprob(model, seqs):
    """log pi(x): the sum of log p(x_t | x_<t) over the real tokens of each sequence (N,), differentiable."""
    x, y = xy(seqs, next(model.parameters()).device)
    logp = F.log_softmax(model(x)[0].float(), -1).gather(-1, y.clamp(min=0)[..., None]).squeeze(-1)  # (N, T-1)
    return (logp * (y != -1)).sum(1)


def npo_loss(logp_theta, logp_ref, beta=0.1):
    """NPO: L = -(2/beta) * mean_x log sigmoid(-beta * (log pi_theta(x) - log pi_ref(x))), on sequence
    log-likelihoods (N,), never on logits. Its gradient is 2 * mean_x sigmoid(beta * d_x) * grad log pi_theta(x):
    GA's, with sequences already pushed below the reference (d_x << 0) weighted down."""
    return -(2 / beta) * F.logsigmoid(-beta * (logp_theta - logp_ref)).mean()


SETTINGS = (UnlearnConfig, RetainConfig, NPOConfig)  # evaluate.py keys its cache on their values


def main(argv=None):
    cfg, rcfg, ncfg = cli(__doc__, *SETTINGS, argv=argv)
    method = method_name("npo", rcfg)
    model, data = load_target(cfg)
    forget = data.split("forget")
    with torch.no_grad():  # pi_ref = theta_o is frozen: it enters only through log pi_ref(x), computed once
        logp_ref = dict(zip(forget.text, seq_logprob(model, forget).tolist()))

    def forget_loss(m, seqs):
        logp = seq_logprob(m, seqs)
        return npo_loss(logp, logp.new_tensor([logp_ref[t] for t in seqs.text]), ncfg.beta)

    model, stats = unlearn(model, data, forget_loss, cfg, rcfg)
    return save_result(method, model, data, stats, cfg, rcfg, ncfg)


if __name__ == "__main__":
    main()
