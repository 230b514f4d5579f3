"""
MemFlex (Tian et al. 2024, "To Forget or Not? Towards Practical Knowledge Unlearning for LLMs", KnowUnDo): locate
the weight matrices that hold the forget set by gradients, then unlearn there only.

$ python unlearn_memflex.py                     # memflex
$ python unlearn_memflex.py --select 50          # select more matrices: the half with the lowest cosines
$ python unlearn_memflex.py --select 100 --mu 0.92   # KnowUnDo's fixed threshold
$ python unlearn_memflex.py --dtype bfloat16    # pure bf16 weights and AdamW state, no float32 master copy

Localization, as KnowUnDo's code does it: two mean gradients at the target weights, one on a randomized copy of the
forget set and one on a randomized copy of the retain set. Randomized = about half of each sequence's answer tokens
replaced by random ids (inputs and targets alike), the loss the cross-entropy on the answer tokens only, averaged
per sequence, then over sequences and over `copies` fresh randomizations. Answer tokens are the tokens after each
sequence's prefix: the record after the account holder's name, the sentence after a person's name or the first
question, a book chunk after its first book_prefix tokens. Per weight matrix: s = cos(forget grad, retain grad) and
m = mean |forget grad|. Where the two splits pull apart (s < mu) the matrix holds what is specific to the forget
set; of those, the ones the forget set pulls hard (m > sigma) are trained with -0.4 * CE(D_f) + 2.0 * CE(D_r);
every other parameter stays bit-identical. Every run prints s and m of each matrix, so thresholds for another model
can be read off. KnowUnDo scores LoRA tensors of a 7B model with a fixed mu = 0.92 (sigma = 6e-4). The full weight
matrices of a small GPT have cosines close to 1 that move by a few hundredths with the seed, so one fixed mu selects
several matrices for one seed and none for the next (README, "Unlearning methods"); by default the bound is relative
instead: the quarter of the matrices where the splits pull apart most (--select 25). `--select 100 --mu 0.92` is
KnowUnDo's rule. Only a few matrices move, so the learning rate is x10, as in SURE.

Reads out/target.pt (trains it first if it is missing) and writes out/memflex.pt and out/memflex.json.
"""
from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from settings import check_range, cli
from unlearn import RetainConfig, UnlearnConfig, block_grads, ce_loss, load_target, save_result, unlearn, xy

# ----------------------------------------------------------------------------------------------------------------
@dataclass
class MemFlexConfig:
    select: float = 25.0  # a matrix is a candidate when its cos(forget grad, retain grad) is in the lowest select %
    mu: float = 1.0  # ... and below mu (KnowUnDo: 0.92, with --select 100; 1 = no absolute bound)
    sigma: float = 6e-4  # ... and its mean |forget grad| > sigma (KnowUnDo's)
    randomize: float = 0.5  # share of answer tokens replaced by random ids before the localization gradients
    copies: int = 3  # randomized copies of each sequence whose gradients are averaged (KnowUnDo: 3)
    forget_weight: float = 0.4  # the loss is -forget_weight * CE(D_f) + retain_weight * CE(D_r)
    retain_weight: float = 2.0  # (the paper's weights)
    lr_scale: float = 10.0  # learning rate = lr * lr_scale on the few selected matrices

    def __post_init__(self):
        check_range(self, select="0..100", mu="-1..1", sigma=">= 0", randomize="0..1", copies=">= 1", forget_weight=">= 0",
              retain_weight=">= 0", lr_scale="> 0")
# ----------------------------------------------------------------------------------------------------------------


def randomize_answers(seqs, share, vocab_size, gen):
    """A copy of seqs where each answer token (position >= prefix, < length) is replaced by a uniformly random id
    from 1..vocab_size-1 with probability `share`."""
    t = torch.arange(seqs.x.size(1))
    answer = (t >= seqs.prefix[:, None]) & (t < seqs.length[:, None])
    flip = answer & (torch.rand(seqs.x.shape, generator=gen) < share)
    return replace(seqs, x=torch.where(flip, torch.randint(1, vocab_size, seqs.x.shape, generator=gen), seqs.x))


def answer_ce(model, seqs):
    """The cross-entropy on the answer tokens x_t, t in [prefix, length), averaged per sequence, then over the
    sequences (KnowUnDo masks the question's labels and takes each sample's mean)."""
    x, y = xy(seqs, next(model.parameters()).device)
    t = torch.arange(1, seqs.x.size(1), device=x.device)
    answer = (t >= seqs.prefix.to(x.device)[:, None]) & (y != -1)  # (N, T-1)
    ce = F.cross_entropy(model(x)[0].float().transpose(1, 2), y.clamp(min=0), reduction="none")  # (N, T-1)
    return ((ce * answer).sum(1) / answer.sum(1)).mean()


def localization_grads(model, seqs, cfg, vocab_size, gen):
    """The mean gradient of answer_ce on `copies` randomized copies of seqs, per block weight matrix."""
    grads = [block_grads(model, answer_ce(model, randomize_answers(seqs, cfg.randomize, vocab_size, gen)))
             for _ in range(cfg.copies)]
    return {n: sum(g[n] for g in grads) / len(grads) for n in grads[0]}


def localize(g_forget, g_retain, mu, sigma, select=100.0):
    """MemFlex's selection: per matrix, s = cos(g_forget, g_retain) and m = mean |g_forget|; keep s < mu and
    m > sigma, and s at most the select-th percentile of all the s (100: no such bound, as KnowUnDo). Returns
    (selected names, {name: (s, m)})."""
    stats = {n: (F.cosine_similarity(g.flatten(), g_retain[n].flatten(), dim=0).item(), g.abs().mean().item())
             for n, g in g_forget.items()}
    low = torch.quantile(torch.tensor([s for s, _ in stats.values()], dtype=torch.float64), select / 100).item()
    return {n for n, (s, m) in stats.items() if s < mu and s <= low and m > sigma}, stats


def main(argv=None):
    cfg, mcfg = cli(__doc__, UnlearnConfig, MemFlexConfig, argv=argv)
    model, data = load_target(cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    g_forget, g_retain = (localization_grads(model, data.split(s), mcfg, data.vocab_size, gen)
                          for s in ("forget", "retain"))
    mask, table = localize(g_forget, g_retain, mcfg.mu, mcfg.sigma, mcfg.select)
    for n, (s, m) in table.items():
        print(f"{n:28s} cos {s:6.3f} mean|g| {m:.2e}{'  <- unlearned here' if n in mask else ''}")
    if not mask:
        raise SystemExit(f"no weight matrix is in the lowest {mcfg.select:g}% of cos, has cos < mu={mcfg.mu} and "
                         f"mean|g| > sigma={mcfg.sigma:g}; raise --select or --mu, or lower --sigma (the table above "
                         f"shows the values)")

    def forget_loss(model, seqs):
        return -mcfg.forget_weight * ce_loss(model, seqs)

    rcfg = RetainConfig("gdr", mcfg.retain_weight)
    model, stats = unlearn(model, data, forget_loss, replace(cfg, lr=cfg.lr * mcfg.lr_scale), rcfg, mask=mask)
    stats["localization"] = {n: dict(cos=s, mean_abs_grad=m) for n, (s, m) in table.items()}
    return save_result("memflex", model, data, stats, cfg, mcfg)


if __name__ == "__main__":
    main()
