"""
The metrics of the study, each a small function with its definition and paper: what MUSE measures (VerbMem,
KnowMem, PrivLeak; Shi et al. 2024, arXiv 2407.06460), what finding 2 measures per sequence (MA, EL_n, outliers,
extraction; Barbulescu & Triantafillou 2024), retained knowledge (Zhang et al. 2024, arXiv 2410.16454), and the
mechanism of finding 1: do the unlearning updates survive rounding? measure() runs them all on one model.
Each is pinned by a hand-checkable test in tests/test_metrics.py.
"""
import re

import torch

import model as M
import quantizers as Q


# ----------------------------------------------------------------------------------------------------------------
# text overlap

def rouge_tokens(text):
    """The rouge_score package's default tokenizer (what MUSE scores with, no stemming): lowercase,
    every run of characters outside [a-z0-9] becomes a space, split on whitespace."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_l_f1(pred_tokens, ref_tokens):
    """ROUGE-L F1 (Lin 2004): with L = |LCS(pred, ref)|, P = L/|pred|, R = L/|ref|,
    F1 = 2PR/(P+R); 0 when either side is empty or nothing matches (as rouge_score does)."""
    if not pred_tokens or not ref_tokens:
        return 0.0
    prev = [0] * (len(ref_tokens) + 1)  # one row of the LCS table, O(|pred|·|ref|) time
    for p in pred_tokens:
        row = [0]
        for j, r in enumerate(ref_tokens):
            row.append(prev[j] + 1 if p == r else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred_tokens), lcs / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


# ----------------------------------------------------------------------------------------------------------------
# membership inference

def min_k_prob(token_logprobs, mask, k=0.4):
    """Min-K% Prob (Shi et al. 2024, "Detecting Pretraining Data from LLMs", arXiv 2310.16789):
    the mean of the lowest max(1, floor(k·n)) of a sequence's n token log-probs (floor as in the
    paper's and MUSE's code). Higher = looks more like a member (seen texts have fewer surprising
    tokens). (N, T) log-probs and bool mask -> (N,)."""
    if token_logprobs.shape != mask.shape:
        raise ValueError(f"token_logprobs {tuple(token_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must have the same shape")
    if not 0 < k <= 1:
        raise ValueError(f"k is a share of the tokens, in (0, 1]; got {k}")
    scores = []
    for lp, m in zip(token_logprobs, mask.bool()):
        lp = lp[m]
        if lp.numel() == 0:
            raise ValueError("a sequence has no scored tokens (its mask is all False)")
        scores.append(lp.sort().values[:max(1, int(k * lp.numel()))].mean())
    return torch.stack(scores)


def auc(pos_scores, neg_scores):
    """ROC AUC = P(pos > neg) + ½·P(pos = neg) over all (pos, neg) pairs: the Mann–Whitney U count
    divided by n_pos·n_neg, computed from mid-ranks in O(n log n)."""
    pos = torch.as_tensor(pos_scores, dtype=torch.float64).flatten()
    neg = torch.as_tensor(neg_scores, dtype=torch.float64).flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("auc needs at least one positive and one negative score")
    both = torch.cat([pos, neg]).sort().values
    below = torch.searchsorted(both, pos, right=False)  # how many scores are < each positive
    upto = torch.searchsorted(both, pos, right=True)    # how many are <= it
    midrank = below + (upto - below + 1) / 2            # 1-based rank, ties share their mean rank
    u = midrank.sum() - pos.numel() * (pos.numel() + 1) / 2
    return (u / (pos.numel() * neg.numel())).item()


def privleak(auc_unlearned, auc_retrain):
    """PrivLeak (Shi et al. 2024, MUSE, arXiv 2407.06460): (AUC_u − AUC_retrain) / AUC_retrain × 100.
    The AUC is MUSE's orientation, mia_auc below: ≈ 0 when the forget set still looks trained on,
    so an under-unlearned model scores near −100, an over-unlearned one positive, retrain 0.
    nan when AUC_retrain is 0 (the ratio is undefined)."""
    return float("nan") if auc_retrain == 0 else (auc_unlearned - auc_retrain) / auc_retrain * 100


# ----------------------------------------------------------------------------------------------------------------
# per-sequence memorization (finding 2)

def ngram_overlap(gen, ref, n):
    """OVERLAP_n(a, b) of Jang et al. 2022: the share of a's n-grams that occur in b
    (0 when a has no n-gram)."""
    grams = [tuple(gen[i:i + n]) for i in range(len(gen) - n + 1)]
    ref_grams = {tuple(ref[i:i + n]) for i in range(len(ref) - n + 1)}
    return sum(g in ref_grams for g in grams) / len(grams) if grams else 0.0


def outlier_counts(ma, low=0.15, high=0.60):
    """c(D_f) of Barbulescu & Triantafillou 2024 as two counts: (#{MA <= low}, #{MA >= high}):
    the over-unlearned sequences (a membership signal) and the ones still memorized."""
    ma = torch.as_tensor(ma, dtype=torch.float64)
    return int((ma <= low).sum()), int((ma >= high).sum())


def holdout_bounds(holdout_ma, q=0.05):
    """(low, high) bounds taken from unseen text: the q and 1−q quantiles (5th/95th percentiles,
    linear interpolation) of the holdout's MA; more stable than the holdout min/max."""
    ma = torch.as_tensor(holdout_ma, dtype=torch.float64)
    return torch.quantile(ma, q).item(), torch.quantile(ma, 1 - q).item()


def ranked_extraction(logprob, n_tokens, exact, k):
    """The likelihood-ranked extraction attack (Carlini et al. 2021, "Extracting Training Data from
    LLMs", rank by perplexity): rank sequences by the model's own mean token log-prob (= −log
    perplexity, fair to unequal lengths), extract the top k, return the share extracted verbatim."""
    k = min(k, len(exact))
    top = (torch.as_tensor(logprob) / torch.as_tensor(n_tokens)).argsort(descending=True)[:k]
    return torch.as_tensor(exact)[top].float().mean().item()


def retained_pct(metric_unlearned, metric_target):
    """Retained knowledge % (Zhang et al. 2024, arXiv 2410.16454): metric(unlearned, p) /
    metric(target, p) × 100 at the same precision p. nan when the target scores 0 (nothing to
    retain, so no share is defined)."""
    return float("nan") if metric_target == 0 else metric_unlearned / metric_target * 100


PAPER_KEEP = 85.3 / 99.8  # the paper's 7B target at 4 bits: VerbMem 99.8 -> 85.3 (Zhang et al. 2024, Table 1)


def damage_matched(target_scores, keep=PAPER_KEEP):
    """The precision that hurts the target as 4 bits hurt the paper's 7B target: of the quantized precisions
    (target_scores: {precision: the target's score there}, "full" among them), the one where the target's score
    is lowest while still at least keep × its full-precision score. A quantizer that wipes the target's own
    memorization cannot show it coming back, and one that leaves it whole cannot move an update either; this one
    sits at the paper's damage. None when no quantized precision keeps that much."""
    full = target_scores["full"]
    ok = {p: s for p, s in target_scores.items() if p != "full" and s >= keep * full}
    return min(ok, key=ok.get) if ok else None


EXCESS_FLOOR = 0.1  # excess_retained is read only where the target leads retrain by 10% of its own score


def excess_retained(metric_unlearned, metric_target, metric_retrain, floor=EXCESS_FLOOR):
    """Retained % of the target's excess over the retrain model at the same precision p:
    (metric(unlearned, p) − metric(retrain, p)) / (metric(target, p) − metric(retrain, p)) × 100. 0 = as clean as
    the gold standard, 100 = as the target. A graded metric such as VerbMem scores text a model never saw far above
    0 (a pretrained model continues templated text well), and quantization moves that floor too; this reads recovery
    above it. A share of a small gap is noise times a large factor (a quantizer that took the target within a point
    of retrain read −158%), so it is nan unless the gap is at least floor × the target's metric (and positive)."""
    gap = metric_target - metric_retrain
    return float("nan") if gap <= 0 or gap < floor * abs(metric_target) else (
        (metric_unlearned - metric_retrain) / gap * 100)


def recovered_share(metric_quantized, metric_full, metric_target_quantized, floor=EXCESS_FLOOR):
    """The share of what unlearning took that quantization gave back, against the target quantized the same way:
    (m(Q(θ_u)) − m(θ_u)) / (m(Q(θ_o)) − m(θ_u)) × 100. 0 = nothing came back, 100 = the unlearned model reads as the
    quantized target. It is excess_retained with the unlearned model at full precision in the retrain model's place,
    so it is nan on the same terms: unless the gap is positive and at least floor × m(Q(θ_o))."""
    return excess_retained(metric_quantized, metric_target_quantized, metric_full, floor)


def predicted_retained(retained_fp, kept, scale=1.0):
    """The recovery law: retained % after quantization at precision p predicted from full precision and the weights,
    retained_q = 100 − kept · (100 − retained_fp) · scale,   scale = m(θ_o) / m(Q(θ_o)).
    Derivation, to first order in the update δ = θ_u − θ_o of a forget metric m: at full precision m(θ_u) − m(θ_o)
    = ∇m·δ = −(100 − retained_fp)/100 · m(θ_o). Quantization moves the unlearned weights kept · δ away from the
    quantized target's (Q(θ_u) − Q(θ_o) ≈ kept · δ along δ, kept as mechanism() measures it), so, with ∇m the same
    at Q(θ_o), m(Q(θ_u)) = m(Q(θ_o)) − kept · (100 − retained_fp)/100 · m(θ_o); divided by m(Q(θ_o)) that is the law.
    kept 1 brings nothing back, kept 0 everything. scale is 1 where quantization leaves the target's own metric
    unchanged (the toy GPT); a target that quantization hurts (SmolLM2 at rtn4, VerbMem 97.8 → 60.5) makes the same
    absolute loss a larger share. The same law holds for the share of the target's excess over the retrain model
    (excess_retained) with scale = (m_t − m_r) / (m_t,q − m_r,q), the gaps at full precision and at p."""
    return 100 - kept * (100 - retained_fp) * scale


def outlier_auc(forget_ma, holdout_ma):
    """Membership of the outliers (Barbulescu & Triantafillou 2024): AUC of |MA(x) − mean holdout MA|,
    forget (positive) against holdout: 0.5 when forget sequences sit where unseen text does; over-
    unlearned ones (MA far below unseen text) raise it just as still-memorized ones do."""
    mean = torch.as_tensor(holdout_ma, dtype=torch.float64).mean()
    dist = lambda ma: (torch.as_tensor(ma, dtype=torch.float64) - mean).abs()
    return auc(dist(forget_ma), dist(holdout_ma))


# ----------------------------------------------------------------------------------------------------------------
# the metrics on a model

def verbmem(model, seqs, decode, prefix_len=None, n_continue=None):
    """VerbMem (MUSE): greedy continuation of each text's prompt, ROUGE-L F1 of the decoded
    continuation against the true one, mean × 100. The prompt is the first prefix_len tokens and the
    continuation the next n_continue (clipped to the text); None = each sequence's own split
    (data/prepare.py: a book chunk's first book_prefix (16) tokens, a secret's holder, a fact's subject)."""
    x, n = seqs.x.tolist(), seqs.length.tolist()
    p = [prefix_len or pi for pi in seqs.prefix.tolist()]
    end = [min(ni, pi + n_continue) if n_continue else ni for pi, ni in zip(p, n)]
    if any(e <= pi for pi, e in zip(p, end)):
        raise ValueError(f"prefix_len {prefix_len} leaves no continuation of some text; lower it")
    gen = M.greedy(model, [xi[:pi] for xi, pi in zip(x, p)], [e - pi for pi, e in zip(p, end)])
    scores = [rouge_l_f1(rouge_tokens(decode(g)), rouge_tokens(decode(xi[pi:e])))
              for g, xi, pi, e in zip(gen, x, p, end)]
    return 100 * sum(scores) / len(scores)


def knowmem_prompts(data, split, room, n_shots=0):
    """KnowMem's prompts (lists of ids) for the questions of data.qa[split]: "Question: q1\nAnswer: a1\n ...
    Question: q\nAnswer:". The shots are the first n_shots holdout pairs other than the one asked: facts never
    trained on, so they teach the format and no answer; the first shots are dropped when the prompt would not fit
    in `room` tokens (the context less the answer's tokens)."""
    prompts = []
    for qa in data.qa[split]:
        shots = [s for s in data.qa["holdout"] if s["question"] != qa["question"]][:n_shots]
        ask = data.encode(f"Question: {qa['question']}\nAnswer:")
        if len(ask) > room:
            raise ValueError(f"question {qa['question']!r} does not fit block_size with the answer")
        ids = [data.encode(f"Question: {s['question']}\nAnswer: {s['answer']}\n") for s in shots]
        while ids and sum(map(len, ids)) + len(ask) > room:
            ids.pop(0)
        prompts.append(sum(ids, []) + ask)
    return prompts


def knowmem(model, data, split, n_shots=0, max_answer_tokens=8):
    """KnowMem (MUSE): for each question of data.qa[split], a few-shot prompt (knowmem_prompts), the greedy
    answer cut at the first newline, ROUGE-L F1 against the reference, mean × 100. MUSE gives a large model
    shots to teach it the format; ours learned the format in training, and at toy scale its memory is tied to
    absolute positions: the target answers memorized questions asked at position 0, and none once two shots push
    the question past position 20 (its KnowMem on D_f fell to 0 with 2 shots). So the default is 0 shots."""
    prompts = knowmem_prompts(data, split, model.config.block_size - max_answer_tokens, n_shots)
    answers = [data.decode(g).split("\n")[0] for g in M.greedy(model, prompts, [max_answer_tokens] * len(prompts))]
    scores = [rouge_l_f1(rouge_tokens(a), rouge_tokens(qa["answer"]))
              for a, qa in zip(answers, data.qa[split])]
    return 100 * sum(scores) / len(scores)


def mia_auc(model, forget, holdout, k=0.4):
    """The AUC behind PrivLeak, in MUSE's orientation: P(s(holdout) > s(forget)) with s = Min-K% Prob,
    higher = member. ≈ 0.5 when forget looks unseen (retrain), → 0 when it looks trained on."""
    return membership_auc(M.score(model, forget), M.score(model, holdout), k)


def membership_auc(forget_scores, holdout_scores, k=0.4):
    """mia_auc from the model.score dicts of the forget and holdout sets (so one pass serves every metric)."""
    forget_s, holdout_s = (min_k_prob(r["token_logprobs"], r["token_mask"], k) for r in (forget_scores, holdout_scores))
    return auc(holdout_s, forget_s)


def el_n(model, seqs, n=10, stride=8):
    """Extraction likelihood (Jang et al. 2022, "Knowledge Unlearning for Mitigating Privacy Risks in
    LMs", Eq. 1) per sequence x of length T: EL_n(x) = mean over t of OVERLAP_n(f(x_<t), x_>=t),
    f the greedy continuation of T − t tokens. The paper sums over every t in [1, T − n]; for speed
    t runs over 1, 1+stride, ... (stride=1 is the exact sum); every (x, t) is decoded in one lock-step batch.
    (N,) tensor; nan for a sequence shorter than n + 1."""
    x, lengths = seqs.x.tolist(), seqs.length.tolist()
    jobs = [(i, t) for i, L in enumerate(lengths) for t in range(1, L - n + 1, stride)]
    total, count = [0.0] * len(x), [0] * len(x)
    for (i, t), g in zip(jobs, M.greedy(model, [x[i][:t] for i, t in jobs], [lengths[i] - t for i, t in jobs])):
        total[i] += ngram_overlap(g, x[i][t:lengths[i]], n)
        count[i] += 1
    return torch.tensor([s / c if c else float("nan") for s, c in zip(total, count)])


def measure(model, data, el_stride=8, top_k=10):
    """Every metric of the study on one model, with one teacher-forced pass per split (model.score):
      memorization  {forget,retain,holdout}_{exact,ma}; forget_exact is also the extraction attack's success
                    (greedy decoding from the prefix reproduces the continuation verbatim)
      MUSE          verbmem_forget, knowmem_forget, knowmem_retain, holdout_ppl, mia_auc (PrivLeak is taken
                    against the retrain model's mia_auc by the caller)
      finding 2     per-sequence MA of forget and holdout, the c(D_f) counts with the fixed 0.15/0.60 bounds and
                    with the holdout's 5th/95th percentiles, the outliers' membership AUC, the likelihood-ranked
                    extraction of the top_k, and mean EL_10 (el_stride 0 skips it: it is the slowest metric)"""
    s = {split: M.score(model, data.split(split)) for split in ("forget", "retain", "holdout")}
    f, h, forget = s["forget"], s["holdout"], data.split("forget")
    row = M.summarize(data, s)
    low, high = outlier_counts(f["ma"])
    hold_low, hold_high = outlier_counts(f["ma"], *holdout_bounds(h["ma"]))
    row.update(verbmem_forget=verbmem(model, forget, data.decode), knowmem_forget=knowmem(model, data, "forget"),
               knowmem_retain=knowmem(model, data, "retain"), holdout_ppl=M.perplexity(model, data.general_val),
               mia_auc=membership_auc(f, h), outliers_low=low, outliers_high=high, outliers_holdout_low=hold_low,
               outliers_holdout_high=hold_high, outlier_auc=outlier_auc(f["ma"], h["ma"]),
               extraction_top_k=ranked_extraction(f["logprob"], forget.length - 1, f["exact"], top_k),
               forget_el=el_n(model, forget, stride=el_stride).nanmean().item() if el_stride else None,
               forget_ma_seq=[round(v, 4) for v in f["ma"].tolist()], forget_exact_seq=f["exact"].int().tolist(),
               holdout_ma_seq=[round(v, 4) for v in h["ma"].tolist()])
    return row


# ----------------------------------------------------------------------------------------------------------------
# the mechanism of finding 1: do the unlearning updates survive rounding?

RATIO_BINS = (0, 0.125, 0.25, 0.5, 1, 2, float("inf"))  # edges of the |δ|/Δ histogram


def grid(W, quant):
    """(code, Δ, Q(W)) of each weight of W (out, in) under quant (quantize.py's block: method, bits, group_size, sym),
    Q(W) quantized and dequantized. rtn: the integer code and its row/group's step (quantize.rtn). nf4/fp4: the
    codebook level (so fp4's −0 and 0 are one code) and Δ = block absmax × the gap between the two levels around
    w/absmax."""
    if quant["method"] in Q.CODEBOOKS:
        levels, bs = Q.CODEBOOKS[quant["method"]].to(W.device), 64  # bitsandbytes' block size
        codes, absmax = Q.codebook_quantize(W, levels, bs)
        a = absmax.repeat_interleave(bs)[:W.numel()].view(W.shape)
        lv = levels.unique()  # sorted, −0 and 0 merged
        j = torch.bucketize(W / a, lv).clamp(1, len(lv) - 1)
        return levels[codes], a * (lv[j] - lv[j - 1]), Q.codebook_dequantize(codes, absmax, levels, bs)
    Q.check(quant["method"], quant["bits"])
    codes, scale, zero = Q.rtn(W, quant["bits"], quant["group_size"], quant["sym"], quant.get("absmax", False))
    step = scale[:, Q.group_of(W.shape[1], quant["group_size"], W.device)]
    return codes, step, Q.dequantize(codes, scale, zero, quant["group_size"])


@torch.no_grad()
def mechanism(theta_o, theta_u, quant):
    """Per quantized matrix (quantize.quantized_layers) of the target θ_o and unlearned θ_u models:
    δ = θ_u − θ_o in units of θ_o's step Δ, as a histogram of |δ|/Δ over RATIO_BINS; `moved`, the
    share with δ ≠ 0; `same`, the share whose code is the same in both models, each quantized on its
    own as a user would (codes, not dequantized values: those differ by the scale's change whenever a
    group's absmax weight moved, however little); `same_moved`, that share among the moved weights:
    the unlearning rounded away. Zhang et al. 2024 argue that |δ| < Δ/2 rounds back and never
    measured it. `kept` = ⟨Q(θ_u) − Q(θ_o), δ⟩ / ⟨δ, δ⟩ (Q: quantize, then dequantize), the share of the update's
    direction that survives rounding: 0 when every move rounds back; about 1 when the moved weights sit anywhere
    in their cells, since a weight then crosses into the next cell with probability |δ|/Δ and moves by Δ, so the
    rounded update is δ on average however many of them round back. rtn, nf4, fp4 only: GPTQ's and AWQ's rounding
    depends on their calibration inputs (update_kept reads kept off their quantized models). "all" pools every
    matrix."""
    if quant["method"] not in ("rtn", *Q.CODEBOOKS):
        raise ValueError(f"mechanism is defined for rtn, nf4 and fp4, not {quant['method']!r}")
    lm_head, res = quant.get("lm_head", False), {}
    layers_u = Q.quantized_layers(theta_u, lm_head)
    for name, layer in Q.quantized_layers(theta_o, lm_head).items():
        w_o, w_u = Q.weight_view(layer).float(), Q.weight_view(layers_u[name]).float()  # (out, in), as quantized
        (c_o, step, q_o), (c_u, _, q_u) = grid(w_o, quant), grid(w_u, quant)
        ratio = (w_u - w_o).abs() / step
        edges = torch.tensor(RATIO_BINS[1:-1], device=ratio.device)
        hist = torch.bincount(torch.bucketize(ratio.flatten(), edges, right=True), minlength=len(RATIO_BINS) - 1)
        moved, same, delta = w_u != w_o, c_u == c_o, (w_u - w_o).double()
        res[name] = dict(n=w_o.numel(), hist=hist.tolist(), moved=int(moved.sum()),
                         same=int(same.sum()), same_moved=int((same & moved).sum()),
                         kept=((q_u - q_o).double() * delta).sum().item(),
                         norm=(delta * delta).sum().item())
    tot = {k: sum(r[k] for r in res.values()) for k in ("n", "moved", "same", "same_moved", "kept", "norm")}
    tot["hist"] = torch.tensor([r["hist"] for r in res.values()]).sum(0).tolist()
    for r in (*res.values(), tot):
        r["same_moved"] = r["same_moved"] / r["moved"] if r["moved"] else float("nan")
        r["moved"], r["same"] = r["moved"] / r["n"], r["same"] / r["n"]
        r["kept"] = r["kept"] / r.pop("norm") if r["moved"] else float("nan")
    return dict(bins=list(RATIO_BINS), layers=res, all=tot)


@torch.no_grad()
def update_kept(theta_o, theta_u, q_o, q_u, lm_head=False):
    """mechanism's `kept` for any quantizer, read off the quantized models themselves: ⟨Q(θ_u) − Q(θ_o), δ⟩ / ⟨δ, δ⟩
    pooled over the quantized matrices, δ = θ_u − θ_o, with Q(θ) the model q_* that the quantizer made of θ (GPTQ
    and AWQ each calibrated through its own model, as a user would quantize it). 1 when Q is the identity, 0 when
    the two quantized models are the same; `moved` is the share of weights with δ ≠ 0."""
    layers = [Q.quantized_layers(m, lm_head) for m in (theta_o, theta_u, q_o, q_u)]
    num = den = moved = n = 0
    for name in layers[0]:
        w_o, w_u, r_o, r_u = (Q.weight_view(ls[name]).double() for ls in layers)
        delta = w_u - w_o
        num, den = num + ((r_u - r_o) * delta).sum().item(), den + (delta * delta).sum().item()
        moved, n = moved + int((delta != 0).sum()), n + delta.numel()
    return dict(kept=num / den if den else float("nan"), moved=moved / n)
