"""
MemFlex (Tian et al. 2024, "To Forget or Not? Towards Practical Knowledge Unlearning for LLMs", KnowUnDo): locate
the weight matrices that hold the forget set by gradients, then unlearn there only.

$ python unlearn_memflex.py                     # memflex
$ python unlearn_memflex.py --select 50          # select more matrices: the half with the lowest cosines
$ python unlearn_memflex.py --select 100 --mu 0.92   # KnowUnDo's fixed threshold
$ python unlearn_memflex.py --dtype bfloat16    # pure bf16 weights and AdamW state, no float32 master copy

Localization, as KnowUnDo's code does it: two mean gradients at the target weights, one on a randomized copy of the
forget set and one on a randomized copy of the retain set. Randomized = of a sequence's n answer tokens, floor(n/2)
positions drawn with replacement, each set to a random non-special id (inputs and targets alike; randomize_answers),
the loss the cross-entropy on the answer tokens only, averaged per sequence, then over sequences and over `copies`
fresh randomizations. Answer tokens are the tokens after each sequence's prefix: the record after the account
holder's name, the sentence after a person's name or the first question, a book chunk after its first book_prefix
tokens. Per weight matrix: s = cos(forget grad, retain grad) and m = mean |forget grad|. Where the two splits pull
apart (s < mu) the matrix holds what is specific to the forget set; of those, the ones the forget set pulls hard
(m > sigma) are trained with -0.4 * CE(D_f) + 2.0 * CE(D_r); every other parameter stays bit-identical. Every run
prints s and m of each matrix, so thresholds for another model can be read off. KnowUnDo scores LoRA tensors of a 7B
model with a fixed mu = 0.92 (sigma = 6e-4). The full weight matrices of a small GPT have cosines close to 1 that
move by a few hundredths with the seed, so one fixed mu selects several matrices for one seed and none for the next
(RESULTS.md, section 5, "Unlearning methods"); by default the bound is relative instead: the quarter of the
matrices where the splits pull apart most (--select 25). `--select 100 --mu 0.92` is KnowUnDo's rule. Only a few
matrices move, so the learning rate is x10, as in SURE.

Reads out/target.pt (trains it first if it is missing) and writes out/memflex.pt and out/memflex.json.
"""
from dataclasses import dataclass, replace

import torch
from torch.nn import functional as F

from data.prepare import encoder
from settings import check_range, cli
from train import bf16_arithmetic
from unlearn import RetainConfig, UnlearnConfig, block_grads, ce_loss, load_target, save_result, unlearn, xy

# ----------------------------------------------------------------------------------------------------------------
@dataclass
class MemFlexConfig:
    select: float = 25.0  # a matrix is a candidate when its cos(forget grad, retain grad) is in the lowest select %
    mu: float = 1.0  # ... and below mu (KnowUnDo: 0.92, with --select 100; 1 = no absolute bound)
    sigma: float = 6e-4  # ... and its mean |forget grad| > sigma (KnowUnDo's)
    randomize: float = 0.5  # floor(randomize * n) of n answer positions drawn with replacement, set to random ids
    copies: int = 3  # randomized copies of each sequence whose gradients are averaged (KnowUnDo: 3)
    forget_weight: float = 0.4  # the loss is -forget_weight * CE(D_f) + retain_weight * CE(D_r)
    retain_weight: float = 2.0  # (the paper's weights)
    lr_scale: float = 10.0  # learning rate = lr * lr_scale on the few selected matrices

    def __post_init__(self):
        check_range(self, select="0..100", mu="-1..1", sigma=">= 0", randomize="0..1", copies=">= 1",
                    forget_weight=">= 0", retain_weight=">= 0", lr_scale="> 0")
# ----------------------------------------------------------------------------------------------------------------


def randomize_answers(seqs, share, ids, gen):
    """A copy of seqs where, in each sequence of n answer tokens (positions prefix .. length-1), k = floor(share * n)
    positions are drawn uniformly with replacement, one after the other, and each drawn position is set to an id
    drawn uniformly from `ids` (a later draw of the same position overwrites the earlier one; so at most k, and about
    n (1 - (1 - 1/n)^k), positions change). The prompt and the padding are never touched.

    KnowUnDo's convert_to_model_format_with_random_label (pretrain/data_module.py) with share = 0.5: floor(n/2)
    draws of random.randint(num_question_tokens, len(input_ids) - 1), each set to random.randint(0, vocab_size - 1),
    redrawn while it is the pad, eos, unk or bos token; inputs and labels are the same list, so both change. Its
    test is `id is tokenizer.eos_token_id`, which in CPython holds for equal ids below 257 only: for Llama-2
    (unk, bos, eos = 0, 1, 2) it excludes them, as meant; `ids` (drawable_ids) excludes the special ids of any
    tokenizer. Its eos label after the answer is appended after the randomization, so it is never replaced; here
    there is no eos label at all (see answer_ce)."""
    x = seqs.x.clone()
    for row, p, end in zip(x, seqs.prefix.tolist(), seqs.length.tolist()):
        n = end - p
        k = int(share * n)
        if k:
            where = (p + torch.randint(n, (k,), generator=gen)).tolist()
            new = ids[torch.randint(len(ids), (k,), generator=gen)].tolist()
            for t, v in zip(where, new):  # in order, so a position drawn twice keeps the last id, as KnowUnDo's loop
                row[t] = v
    return replace(seqs, x=x)


def drawable_ids(data):
    """The ids a randomized answer token is drawn from: the whole vocabulary but its special ids, as KnowUnDo redraws
    a pad, eos, unk or bos id. The compact vocabulary's only special id is 0 (<|endoftext|>, also the padding); a
    Hugging Face tokenizer's are its all_special_ids. (KnowUnDo draws below tokenizer.vocab_size, which leaves out
    added tokens; here every id of len(tokenizer), the size of the model's embedding, is drawable but the special.)"""
    special = [0] if data.vocab else encoder(data.config["tokenizer"]).tok.all_special_ids
    keep = torch.ones(data.vocab_size, dtype=torch.bool)
    keep[special] = False
    return torch.arange(data.vocab_size)[keep]


def answer_ce(model, seqs):
    """The cross-entropy on the answer tokens x_t, t in [prefix, length), averaged per sequence, then over the
    sequences (KnowUnDo masks the question's labels and takes each sample's mean, with batch size 1). KnowUnDo's
    labels also hold an eos after the answer, the token its fine-tuning taught the model to end an answer with. Our
    sequences hold no eos (data/prepare.py encodes prompt + rest without one; a book chunk fills seq_len), and
    train.py never makes the padding after length a target, so the target was never taught to end a sequence: an
    eos label here would add a term for a token it never learned there, in the forget and retain sets alike."""
    x, y = xy(seqs, next(model.parameters()).device)
    t = torch.arange(1, seqs.x.size(1), device=x.device)
    answer = (t >= seqs.prefix.to(x.device)[:, None]) & (y != -1)  # (N, T-1)
    ce = F.cross_entropy(model(x)[0].float().transpose(1, 2), y.clamp(min=0), reduction="none")  # (N, T-1)
    return ((ce * answer).sum(1) / answer.sum(1)).mean()


def localization_grads(model, seqs, cfg, ids, gen):
    """The mean gradient of answer_ce on `copies` randomized copies of seqs, per block weight matrix."""
    grads = [block_grads(model, answer_ce(model, randomize_answers(seqs, cfg.randomize, ids, gen)))
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


SETTINGS = (UnlearnConfig, MemFlexConfig)  # evaluate.py keys its cache on their values


def main(argv=None):
    cfg, mcfg = cli(__doc__, *SETTINGS, argv=argv)
    model, data = load_target(cfg)
    gen, ids = torch.Generator().manual_seed(cfg.seed), drawable_ids(data)
    with bf16_arithmetic(model):
        g_forget, g_retain = (localization_grads(model, data.split(s), mcfg, ids, gen)
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
