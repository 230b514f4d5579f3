"""
MemFlex (Tian et al. 2024, "To Forget or Not? Towards Practical Knowledge Unlearning for LLMs", KnowUnDo): locate
the weight matrices that hold the forget set by gradients, then unlearn there only (SPEC §3).

$ python unlearn_memflex.py                     # memflex
$ python unlearn_memflex.py --mu 0.5            # select more matrices
$ python unlearn_memflex.py --dtype bfloat16    # pure bf16 weights and AdamW state, no float32 master copy

Localization compares two mean gradients of CE at the target weights: on the forget set, and on a copy of the
forget set with about half of its answer tokens replaced by random ones. Answer tokens are the tokens after each
sequence's prefix: the record after the account holder's name, the sentence after a person's name or the first
question, a book chunk after its first book_prefix tokens. Matrices where the two gradients point apart (cosine
s < mu) carry the specific answers rather than the shared language; of those, the ones the forget set pulls hard
(mean |grad| m > sigma) are trained with -0.4 * CE(D_f) + 2.0 * CE(D_r), D_r being the real retain set; every
other parameter stays bit-identical.

Thresholds, scaled to this model (measured on the default out/target.pt): s lies in -0.08..0.38 there, far below
the paper's mu = 0.92 (which would select everything: making half of a memorized answer random changes its gradient
a lot), and m in 6e-5..9e-4. mu = 0.3 drops the late layers' matrices whose two gradients agree most; sigma = 1e-4
drops the ones the forget set hardly pulls; 8 of the 16 matrices remain. Every run prints s and m of each matrix.
Only a few matrices move, so the learning rate is x10, as in SURE.

Reads out/target.pt (trains it first if it is missing) and writes out/memflex.pt and out/memflex.json.
"""
from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from model import cli
from unlearn_ga import RetainConfig, UnlearnConfig, block_grads, ce_loss, load_target, save_result, unlearn

# ----------------------------------------------------------------------------------------------------------------
@dataclass
class MemFlexConfig:
    mu: float = 0.3  # a matrix is a candidate when cos(forget grad, randomized-answer grad) < mu (paper: 0.92)
    sigma: float = 1e-4  # ... and its mean |forget grad| > sigma (both scaled to this model, see above)
    randomize: float = 0.5  # share of answer tokens replaced by random ids in the localization's second split
    forget_weight: float = 0.4  # the loss is -forget_weight * CE(D_f) + retain_weight * CE(D_r)
    retain_weight: float = 2.0  # (the paper's weights)
    lr_scale: float = 10.0  # learning rate = lr * lr_scale on the few selected matrices
# ----------------------------------------------------------------------------------------------------------------


def randomize_answers(seqs, share, vocab_size, gen):
    """A copy of seqs where each answer token (position >= prefix, < length) is replaced by a uniformly random id
    from 1..vocab_size-1 with probability `share`."""
    t = torch.arange(seqs.x.size(1))
    answer = (t >= seqs.prefix[:, None]) & (t < seqs.length[:, None])
    flip = answer & (torch.rand(seqs.x.shape, generator=gen) < share)
    return replace(seqs, x=torch.where(flip, torch.randint(1, vocab_size, seqs.x.shape, generator=gen), seqs.x))


def localize(g_forget, g_retain, mu, sigma):
    """MemFlex's selection: per matrix, s = cos(g_forget, g_retain) and m = mean |g_forget|; keep s < mu and
    m > sigma. Returns (selected names, {name: (s, m)})."""
    stats = {n: (F.cosine_similarity(g.flatten(), g_retain[n].flatten(), dim=0).item(), g.abs().mean().item())
             for n, g in g_forget.items()}
    return {n for n, (s, m) in stats.items() if s < mu and m > sigma}, stats


def main(argv=None):
    cfg, mcfg = cli(__doc__, UnlearnConfig, MemFlexConfig, argv=argv)
    model, data = load_target(cfg)
    forget = data.split("forget")
    shuffled = randomize_answers(forget, mcfg.randomize, data.vocab_size, torch.Generator().manual_seed(cfg.seed))
    g_forget, g_shuffled = block_grads(model, ce_loss(model, forget)), block_grads(model, ce_loss(model, shuffled))
    mask, table = localize(g_forget, g_shuffled, mcfg.mu, mcfg.sigma)
    for n, (s, m) in table.items():
        print(f"{n:28s} cos {s:6.3f} mean|g| {m:.2e}{'  <- unlearned here' if n in mask else ''}")
    if not mask:
        raise SystemExit(f"no weight matrix has cos < mu={mcfg.mu} and mean|g| > sigma={mcfg.sigma:g}; "
                         f"raise --mu or lower --sigma (the table above shows the values)")

    def forget_loss(model, seqs):
        return -mcfg.forget_weight * ce_loss(model, seqs)

    rcfg = RetainConfig("gdr", mcfg.retain_weight)
    model, stats = unlearn(model, data, forget_loss, replace(cfg, lr=cfg.lr * mcfg.lr_scale), rcfg, mask=mask)
    return save_result("memflex", model, data, stats, cfg, mcfg)


if __name__ == "__main__":
    main()
