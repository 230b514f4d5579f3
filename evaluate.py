"""
The study (SPEC §5-§6): every unlearning method, every precision, every metric, in one command.

$ python evaluate.py                               # trains what is missing, runs the 14 methods, measures 16 models
                                                   # x 5 precisions -> out/results.json, out/results.csv, figures/*.png
$ python evaluate.py --methods ga_gdr,npo_klr --precisions fp32,rtn4,fp4
$ python evaluate.py --force                       # rerun every method, re-measure every row
$ python evaluate.py --dtype bfloat16 --unlearn_args "--lr 1e-4 --steps 100"   # pure bf16 unlearning, other lr
$ python evaluate.py --sweep                       # issue 6: the study over lr, dtype, alpha, base, width, seeds and
                                                   # 8 quantizers -> out/sweep.json, figures/6_when.png
$ python -c "import evaluate, json; evaluate.figures(json.load(open('out/results.json')))"   # redraw the figures

base/target/retrain are trained only when missing (`python model.py --force` retrains them); a method runs when
its checkpoint is missing, older than target.pt, or made by another command line; each (model, precision) row is
cached in out/rows/ and measured again only when its checkpoint, the target or the settings change. The quantized
models live in memory only. Methods and rows run in worker processes, one per CPU core (--workers). Logs of training
and unlearning: out/logs/. The sweep runs the same study once per condition and resumes where it stopped.

The metrics come first: each a small function, pure where it can be, with its definition and paper in the
docstring and a hand-checkable test in tests/test_evaluate.py.
"""
import concurrent.futures
import contextlib
import copy
import csv
import hashlib
import importlib
import io
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

import model as M
import quantize as Q
from data.prepare import DataConfig, atomic_write_bytes, check_range, load_data


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


def outlier_auc(forget_ma, holdout_ma):
    """Membership of the outliers (Barbulescu & Triantafillou 2024): AUC of |MA(x) − mean holdout MA|,
    forget (positive) against holdout: 0.5 when forget sequences sit where unseen text does; over-
    unlearned ones (MA far below unseen text) raise it just as still-memorized ones do."""
    mean = torch.as_tensor(holdout_ma, dtype=torch.float64).mean()
    dist = lambda ma: (torch.as_tensor(ma, dtype=torch.float64) - mean).abs()
    return auc(dist(forget_ma), dist(holdout_ma))


# ----------------------------------------------------------------------------------------------------------------
# the metrics on a model

@torch.no_grad()
def greedy(model, prompts, max_new):
    """Greedy continuations (lists of ids) of prompts (lists of ids), max_new[i] tokens for prompt i, all decoded
    together in lock-step with a KV cache: one forward pass per position t for every sequence at once, which is
    fed its own prompt token while t is inside its prompt and its previous argmax after. The GPT has no padding
    mask, so prompts of unequal length cannot be left-padded into one batch; lock-step needs no padding, and makes
    max(length) forward passes instead of one per position per prompt length."""
    dev = next(model.parameters()).device
    n, k = torch.tensor([len(p) for p in prompts]), torch.tensor(max_new)
    x = torch.zeros(len(prompts), int((n + k).max()), dtype=torch.long)
    for row, p in zip(x, prompts):
        row[:len(p)] = torch.tensor(p)
    x, n, caches, t0 = x.to(dev), n.to(dev), [{} for _ in model.transformer.h], int(n.min())
    logits, _ = model(x[:, :t0], caches=caches)  # the part every prompt has
    for t in range(t0, x.size(1)):
        x[:, t] = torch.where(t < n, x[:, t], logits[:, -1].argmax(-1))
        if t + 1 < x.size(1):
            logits, _ = model(x[:, t:t + 1], caches=caches, pos0=t)
    return [row[a:a + b] for row, a, b in zip(x.tolist(), n.tolist(), k.tolist())]


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
    gen = greedy(model, [xi[:pi] for xi, pi in zip(x, p)], [e - pi for pi, e in zip(p, end)])
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
    answers = [data.decode(g).split("\n")[0] for g in greedy(model, prompts, [max_answer_tokens] * len(prompts))]
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
    for (i, t), g in zip(jobs, greedy(model, [x[i][:t] for i, t in jobs], [lengths[i] - t for i, t in jobs])):
        total[i] += ngram_overlap(g, x[i][t:lengths[i]], n)
        count[i] += 1
    return torch.tensor([s / c if c else float("nan") for s, c in zip(total, count)])


def measure(model, data, el_stride=8, top_k=10):
    """Every metric of SPEC §5 on one model, with one teacher-forced pass per split (model.score):
      memorization  {forget,retain,holdout}_{exact,ma}; forget_exact is also the extraction attack's success
                    (greedy decoding from the prefix reproduces the continuation verbatim)
      MUSE          verbmem_forget, knowmem_forget, knowmem_retain, holdout_ppl, mia_auc (PrivLeak is taken
                    against the retrain model's mia_auc by the caller)
      finding 2     per-sequence MA of forget and holdout, the c(D_f) counts with the fixed 0.15/0.60 bounds and
                    with the holdout's 5th/95th percentiles, the outliers' membership AUC, the likelihood-ranked
                    extraction of the top_k, and mean EL_10 (el_stride 0 skips it: it is the slowest metric)"""
    s = {split: M.score(model, data.split(split)) for split in ("forget", "retain", "holdout")}
    f, h, forget = s["forget"], s["holdout"], data.split("forget")
    row = {f"{split}_{m}": r[m].float().mean().item() for split, r in s.items() for m in ("exact", "ma")}
    low, high = outlier_counts(f["ma"])
    hold_low, hold_high = outlier_counts(f["ma"], *holdout_bounds(h["ma"]))
    row.update(verbmem_forget=verbmem(model, forget, data.decode), knowmem_forget=knowmem(model, data, "forget"),
               knowmem_retain=knowmem(model, data, "retain"), holdout_ppl=M.perplexity(model, data.general_val),
               mia_auc=membership_auc(f, h), outliers_low=low, outliers_high=high, outliers_holdout_low=hold_low,
               outliers_holdout_high=hold_high, outlier_auc=outlier_auc(f["ma"], h["ma"]),
               extraction_top_k=ranked_extraction(f["logprob"], forget.length - 1, f["exact"], top_k),
               forget_el=el_n(model, forget, stride=el_stride).nanmean().item() if el_stride else None,
               forget_ma_seq=[round(v, 4) for v in f["ma"].tolist()],
               holdout_ma_seq=[round(v, 4) for v in h["ma"].tolist()])
    return row


# ----------------------------------------------------------------------------------------------------------------
# the mechanism of finding 1: do the unlearning updates survive rounding?

RATIO_BINS = (0, 0.125, 0.25, 0.5, 1, 2, float("inf"))  # edges of the |δ|/Δ histogram


def grid(W, quant):
    """(code, Δ) of each weight of W (out, in) under quant (quantize.py's block: method, bits,
    group_size, sym). rtn: the integer code and its row/group's step (quantize.rtn). nf4/fp4: the
    codebook level (so fp4's −0 and 0 are one code) and Δ = block absmax × the gap between the two
    levels around w/absmax."""
    if quant["method"] in Q.CODEBOOKS:
        levels, bs = Q.CODEBOOKS[quant["method"]].to(W.device), 64  # bitsandbytes' block size
        codes, absmax = Q.codebook_quantize(W, levels, bs)
        a = absmax.repeat_interleave(bs)[:W.numel()].view(W.shape)
        lv = levels.unique()  # sorted, −0 and 0 merged
        j = torch.bucketize(W / a, lv).clamp(1, len(lv) - 1)
        return levels[codes], a * (lv[j] - lv[j - 1])
    Q.check(quant["method"], quant["bits"])
    if quant["group_size"] and W.shape[1] % quant["group_size"]:
        raise ValueError(f"group_size {quant['group_size']} does not divide {W.shape[1]} columns")
    codes, scale, _ = Q.rtn(W, quant["bits"], quant["group_size"], quant["sym"], quant.get("absmax", False))
    return codes, scale.repeat_interleave(W.shape[1] // scale.shape[1], dim=1)


def rounded(W, quant):
    """Q(W): W (out, in) quantized and dequantized by rtn or a codebook, as quant (quantize.py's block) says."""
    if quant["method"] in Q.CODEBOOKS:
        levels = Q.CODEBOOKS[quant["method"]]
        return Q.codebook_dequantize(*Q.codebook_quantize(W, levels), levels)
    return Q.dequantize(*Q.rtn(W, quant["bits"], quant["group_size"], quant["sym"], quant.get("absmax", False)))


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
    rounded update is δ on average however many of them round back. rtn, nf4, fp4 only: GPTQ's rounding depends on
    its calibration inputs. "all" pools every matrix."""
    if quant["method"] not in ("rtn", *Q.CODEBOOKS):
        raise ValueError(f"mechanism is defined for rtn, nf4 and fp4, not {quant['method']!r}")
    lm_head, res = quant.get("lm_head", False), {}
    layers_u = Q.quantized_layers(theta_u, lm_head)
    for name, layer in Q.quantized_layers(theta_o, lm_head).items():
        w_o, w_u = layer.weight.float(), layers_u[name].weight.float()
        (c_o, step), (c_u, _) = grid(w_o, quant), grid(w_u, quant)
        ratio = (w_u - w_o).abs() / step
        edges = torch.tensor(RATIO_BINS[1:-1], device=ratio.device)
        hist = torch.bincount(torch.bucketize(ratio.flatten(), edges, right=True), minlength=len(RATIO_BINS) - 1)
        moved, same, delta = w_u != w_o, c_u == c_o, (w_u - w_o).double()
        res[name] = dict(n=w_o.numel(), hist=hist.tolist(), moved=int(moved.sum()),
                         same=int(same.sum()), same_moved=int((same & moved).sum()),
                         kept=((rounded(w_u, quant) - rounded(w_o, quant)).double() * delta).sum().item(),
                         norm=(delta * delta).sum().item())
    tot = {k: sum(r[k] for r in res.values()) for k in ("n", "moved", "same", "same_moved", "kept", "norm")}
    tot["hist"] = torch.tensor([r["hist"] for r in res.values()]).sum(0).tolist()
    for r in (*res.values(), tot):
        r["same_moved"] = r["same_moved"] / r["moved"] if r["moved"] else float("nan")
        r["moved"], r["same"] = r["moved"] / r["n"], r["same"] / r["n"]
        r["kept"] = r["kept"] / r.pop("norm") if r["moved"] else float("nan")
    return dict(bins=list(RATIO_BINS), layers=res, all=tot)


# ----------------------------------------------------------------------------------------------------------------
# the study

SCRIPTS = {  # method (SPEC §9) -> the command that writes out/<method>.pt
    "ga": "unlearn_ga", "ga_gdr": "unlearn_ga --retain gdr", "ga_klr": "unlearn_ga --retain klr",
    "npo": "unlearn_npo", "npo_gdr": "unlearn_npo --retain gdr", "npo_klr": "unlearn_npo --retain klr",
    "ga_gdr_sure": "unlearn_ga --retain gdr --sure", "ga_klr_sure": "unlearn_ga --retain klr --sure",
    "npo_gdr_sure": "unlearn_npo --retain gdr --sure", "npo_klr_sure": "unlearn_npo --retain klr --sure",
    "sga": "unlearn_ga --selective", "ta": "task_arithmetic", "tau": "task_arithmetic --tau",
    "memflex": "unlearn_memflex"}
CONSTRAINED = ("ga_gdr", "ga_klr", "npo_gdr", "npo_klr")  # the utility-constrained methods of the 21% -> 83%
SURE = tuple(m + "_sure" for m in CONSTRAINED)  # the same with SURE, the paper's fix, averaged on their own
PRECISIONS = {"fp32": None, **{name: Q.QuantConfig(method=method, bits=bits, **kw) for name, method, bits, kw in (
    ("int8", "rtn", 8, dict(absmax=True)), ("rtn4", "rtn", 4, {}), ("gptq4", "gptq", 4, {}), ("nf4", "nf4", 4, {}),
    ("fp4", "fp4", 4, {}), ("rtn4_asym", "rtn", 4, dict(sym=False)), ("rtn4_g64", "rtn", 4, dict(group_size=64)))}}
# block Linears only; per output channel and symmetric (the paper's Eq. 2) unless the name says _asym (min-max) or
# _g64 (a grid per 64 input columns); nf4/fp4 per block of 64. "fp32" is the unquantized model in its own dtype
RETAINED = ("verbmem_forget", "knowmem_forget", "forget_exact")  # retained % is reported for these
PACKAGES = ("torch", "numpy", "tiktoken", "matplotlib")  # their versions go into results.json


@dataclass
class StudyConfig:
    out_dir: str = "out"  # checkpoints are read and made here; results.json/.csv, rows/ and logs/ are written here
    fig_dir: str = "figures"  # where the figures go
    methods: str = ",".join(SCRIPTS)  # comma list of the unlearning methods to run (when missing) and measure
    precisions: str = "fp32,int8,rtn4,gptq4,nf4"  # comma list of fp32 int8 rtn4 gptq4 nf4 fp4 (fp32 is always in)
    force: bool = False  # rerun every method and re-measure every row (`python model.py --force` retrains the models)
    seed: int = 1337  # training, unlearning, and GPTQ's calibration windows
    device: str = "auto"  # 'auto' = cuda if present, else cpu
    workers: int = 0  # processes running methods and measurements side by side; 0 = one per CPU core up to 4
    el_stride: int = 8  # EL_10 starts at t = 1, 1+stride, ... and is measured at fp32 only (0 = not at all)
    top_k: int = 10  # the likelihood-ranked extraction attack extracts the k likeliest forget sequences
    dtype: str = "float32"  # weights of the unlearning runs, float32 | bfloat16 (pure); target/retrain measured in it
    unlearn_args: str = ""  # more settings for every unlearning script, e.g. "--lr 1e-4 --steps 100"
    sweep: bool = False  # instead of one study, the sweep of SWEEP below -> out/sweep.json, figures/6_when.png
    seeds: str = ""  # comma list, e.g. 1337,1338,1339: the study at each seed -> out/seeds.json, mean ± sd

    def __post_init__(self):
        check_range(self, workers=">= 0", el_stride=">= 0", top_k=">= 1")


def names(value, valid, flag):
    """The names of a comma list, each one checked against the valid ones."""
    got = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in got if v not in valid]
    if bad or not got:
        raise SystemExit(f"--{flag} {value!r}: {'unknown ' + ', '.join(bad) if bad else 'no names'}; "
                         f"the valid ones are {','.join(valid)}")
    return list(dict.fromkeys(got))


def logged(log, fn, *args):
    """fn(*args) with what it prints sent to the file `log`, so that the study's own output stays one line a stage."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f, contextlib.redirect_stdout(f):
        return fn(*args)


def command(cfg, name):
    """The command line that makes out_dir/<name>.pt: the method's script with the study's out_dir, seed, device,
    dtype and unlearn_args. Its log's first line records it, so a checkpoint made otherwise is made again."""
    return (SCRIPTS[name].split() + ["--out_dir", cfg.out_dir, "--seed", str(cfg.seed), "--device", cfg.device,
                                     "--dtype", cfg.dtype] + shlex.split(cfg.unlearn_args))


def made_by(cfg, name):
    """The command line in the first line of out_dir/logs/<name>.log, or None."""
    try:
        with open(Path(cfg.out_dir) / "logs" / f"{name}.log") as f:
            return shlex.split(f.readline())[1:]
    except OSError:
        return None


def run_method(cfg, name):
    """A job: the method's script, through its main(argv), as command(cfg, name) says; returns the seconds it
    took."""
    module, *argv = command(cfg, name)
    log, t = Path(cfg.out_dir) / "logs" / f"{name}.log", time.time()

    def run():
        print(shlex.join(["python", module, *argv]), flush=True)
        importlib.import_module(module).main(argv)
    try:
        logged(log, run)
    except SystemExit as e:
        raise SystemExit(f"{name} (python {module}.py {shlex.join(argv)}) failed: {e}\nits log: {log}") from None
    return time.time() - t


def plain(x):
    """JSON-safe copy: nan and inf become null (json.dumps would write NaN, which strict readers refuse)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def row_key(cfg, name, prec):
    """What a cached row depends on: the model's and the target's checkpoint (mtime, size) and the settings."""
    stamp = lambda p: [p.stat().st_mtime_ns, p.stat().st_size] if p.exists() else None
    quant = PRECISIONS[prec] and asdict(replace(PRECISIONS[prec], seed=cfg.seed))
    out = Path(cfg.out_dir)
    return dict(model=stamp(out / f"{name}.pt"), target=stamp(out / "target.pt"), quant=quant, dtype=cfg.dtype,
                el_stride=cfg.el_stride, top_k=cfg.top_k)


def cached(cfg, name, prec):
    """The cached row of (model, precision) if it is still valid, else None."""
    path = Path(cfg.out_dir) / "rows" / f"{name}_{prec}.json"
    try:
        c = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return c if c.get("key") == row_key(cfg, name, prec) else None


def measure_model(cfg, name, precisions):
    """A job: the rows of one model at the given precisions, each a copy quantized in memory and measured, for the
    unlearned models at rtn/nf4/fp4 with the mechanism against the target; each row is cached in out/rows/."""
    out, dev, dtype, res = Path(cfg.out_dir), M.pick_device(cfg.device), M.weight_dtype(cfg.dtype), []
    target, ckpt = M.load_checkpoint(out / "target.pt", dev)
    data = load_data(DataConfig(**ckpt["data"]), out)
    target, model = target.to(dtype), M.load_checkpoint(out / f"{name}.pt", dev)[0].to(dtype)
    for p in precisions:
        t, qmodel, qcfg, quant = time.time(), copy.deepcopy(model), PRECISIONS[p], {}
        row = dict(model=name, precision=p)
        if qcfg is not None:
            _, quant = Q.quantize_with(qmodel, replace(qcfg, seed=cfg.seed), data)
            row["quant_error"] = quant["rel_output_error"]  # mean relative output error of the Linears
        row.update(measure(qmodel, data, cfg.el_stride if qcfg is None else 0, cfg.top_k))
        if quant and quant["method"] != "gptq" and name in SCRIPTS:
            mech = mechanism(target, model, quant)
            pooled = mech["all"]
            row.update(mech_hist=[h / pooled["n"] for h in pooled["hist"]], mech_moved=pooled["moved"],
                       mech_same=pooled["same"], mech_same_moved=pooled["same_moved"],  # moved, yet rounds back
                       mech_kept=pooled["kept"], mech_layers={  # the same per quantized matrix
                           n: {k: r[k] for k in ("moved", "same", "same_moved", "kept")} for n, r in mech["layers"].items()})
        res.append(dict(key=row_key(cfg, name, p), row=plain(row),
                        seconds=dict(quantize=quant.get("seconds", 0.0), total=round(time.time() - t, 2))))
        M.write_json(out / "rows" / f"{name}_{p}.json", res[-1])
    return res


def jobs(pool, fn, args):
    """Yields (args, fn(*args)) for each tuple of args, as the jobs finish in the pool (here, without one)."""
    if pool is None:
        yield from ((a, fn(*a)) for a in args)
        return
    futures = {pool.submit(fn, *a): a for a in args}
    for f in concurrent.futures.as_completed(futures):
        yield futures[f], f.result()


class Progress:
    """A line per finished stage: the time since the start, and what is left, estimated from the mean time of the
    units of each kind done so far (before the first one, a guess from one CPU core at the default settings),
    the methods and rows shared among the workers."""
    GUESS = dict(train=300.0, method=10.0, row=2.0)

    def __init__(self, workers, **todo):
        self.t0, self.workers, self.todo, self.spent = time.time(), workers, todo, {k: [] for k in todo}

    def done(self, kind, what, seconds, n=1):
        self.todo[kind] = max(0, self.todo[kind] - n)
        self.spent[kind] += [seconds / n] * n
        each = {k: np.mean(v) if v else self.GUESS[k] for k, v in self.spent.items()}
        left = sum(n * each[k] / (1 if k == "train" else self.workers) for k, n in self.todo.items())
        print(f"[{time.time() - self.t0:5.0f}s] {what} ({seconds:.1f}s) | ~{left:.0f}s left", flush=True)
        return round(seconds, 2)


def relative(rows, precisions):
    """Adds what compares models at the same precision p: PrivLeak against this run's retrain model at p (its AUC
    moves with quantization too, so the unlearned model is held to the gold standard under the same rounding; the
    paper's code hard-codes one full-precision AUC), and retained % against the target at p. Returns retained %
    averaged over the utility-constrained methods, and over their SURE versions, per precision."""
    by = {(r["model"], r["precision"]): r for r in rows}
    for r in rows:
        target, retrain = by["target", r["precision"]], by["retrain", r["precision"]]
        r["privleak"] = privleak(r["mia_auc"], retrain["mia_auc"])
        r.update({f"retained_{k}": retained_pct(r[k], target[k]) for k in RETAINED})
    mean = lambda v: torch.tensor(v, dtype=torch.float64).nanmean().item()
    summary = {}
    for p in precisions:
        for group, members in (("constrained", CONSTRAINED), ("sure", SURE)):
            rs = [by[m, p] for m in members if (m, p) in by]
            if rs:
                summary.setdefault(p, {})[group] = dict(methods=[r["model"] for r in rs], **{
                    k: mean([r[f"retained_{k}"] for r in rs]) for k in RETAINED})
    return summary


def cpu_time():
    """CPU seconds (user + system) of this process and of its finished child processes (the workers)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def write_csv(path, rows):
    """One line per (model, precision), the scalar columns (the per-sequence lists are in results.json)."""
    cols = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (list, dict))))
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def main(argv=None):
    (cfg,) = M.cli(__doc__, StudyConfig, argv=argv)
    if cfg.sweep:
        return sweep(cfg)
    if cfg.seeds:
        return over_seeds(cfg, sys.argv[1:] if argv is None else argv)
    M.weight_dtype(cfg.dtype)  # refuses an unknown one before anything runs
    methods = names(cfg.methods, SCRIPTS, "methods")
    precisions = list(dict.fromkeys(["fp32", *names(cfg.precisions, PRECISIONS, "precisions")]))
    out, dev, t_start, seconds, cpu_start = Path(cfg.out_dir), M.pick_device(cfg.device), time.time(), {}, cpu_time()
    workers = cfg.workers or (1 if dev.startswith("cuda") else min(4, os.cpu_count() or 1))
    models = ["target", "retrain", *methods]
    train = not all((out / f"{n}.pt").exists() for n in ("target", "retrain"))
    older = lambda m: not (out / f"{m}.pt").exists() or train or made_by(cfg, m) != command(cfg, m) or (
        (out / f"{m}.pt").stat().st_mtime_ns < (out / "target.pt").stat().st_mtime_ns)
    run = [m for m in methods if cfg.force or older(m)]  # missing, made otherwise, or from an earlier target
    todo = {n: [p for p in precisions if cfg.force or n in run or cached(cfg, n, p) is None] for n in models}
    progress = Progress(workers, train=int(train), method=len(run), row=sum(map(len, todo.values())))
    print(f"study: {'training base/target/retrain, ' if train else ''}{len(run)} of {len(methods)} methods to run, "
          f"{progress.todo['row']} of {len(models) * len(precisions)} rows to measure, {workers} worker(s); "
          f"logs in {out / 'logs'}", flush=True)
    if train:
        t = time.time()
        logged(out / "logs" / "train.log", M.train_all,
               M.TrainConfig(out_dir=cfg.out_dir, device=cfg.device, seed=cfg.seed), DataConfig())
        seconds["train"] = progress.done("train", "data, base, target, retrain", time.time() - t)

    # one torch thread per worker: the models are small, and the workers share the cores
    pool = None if workers == 1 else concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=torch.set_num_threads, initargs=(1,))
    try:
        for (_, m), s in jobs(pool, run_method, [(cfg, m) for m in run]):
            seconds.setdefault("methods", {})[m] = progress.done("method", f"{m} -> {out / m}.pt", s)
        t_rows = time.time()
        for (_, name, _), res in jobs(pool, measure_model, [(cfg, n, ps) for n, ps in todo.items() if ps]):
            progress.done("row", f"{name} at {', '.join(c['row']['precision'] for c in res)}",
                          sum(c["seconds"]["total"] for c in res), len(res))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    cache = {(n, p): cached(cfg, n, p) for n in models for p in precisions}
    rows = [c["row"] for c in cache.values()]
    summary = relative(rows, precisions)
    seconds.update(rows=round(time.time() - t_rows, 2),
                   per_row={f"{n}_{p}": c["seconds"] for (n, p), c in cache.items()})

    _, target_ckpt = M.load_checkpoint(out / "target.pt")
    method_meta = {m: {k: v for k, v in json.loads((out / f"{m}.json").read_text()).items()
                       if k in ("config", "steps", "stopped", "lr", "trained", "seconds")}
                   for m in methods if (out / f"{m}.json").exists()}
    meta = dict(seed=cfg.seed, settings=asdict(cfg), models=models, precisions=precisions,
                rows_measured=sum(map(len, todo.values())),  # the others came from out/rows/
                versions=dict(python=platform.python_version(), **{p: version(p) for p in PACKAGES}),
                corpora=target_ckpt["corpora"], data=target_ckpt["data"], training=target_ckpt["config"],
                methods=method_meta, mech_bins=list(RATIO_BINS[:-1]), seconds=seconds,
                quantizers={p: PRECISIONS[p] and asdict(replace(PRECISIONS[p], seed=cfg.seed)) for p in precisions},
                machine=dict(platform=platform.platform(), cpu_count=os.cpu_count(), device=dev, workers=workers,
                             torch_threads=torch.get_num_threads()))
    results = plain(dict(meta=meta, retained=summary, rows=rows))
    t = time.time()
    paths = figures(results, cfg.fig_dir) if cfg.fig_dir else []
    seconds.update(figures=round(time.time() - t, 2), total=round(time.time() - t_start, 2),
                   cpu=round(cpu_time() - cpu_start, 2))  # of this process and its workers, all cores
    results["meta"]["seconds"] = seconds
    M.write_json(out / "results.json", results)
    write_csv(out / "results.csv", results["rows"])
    report(results)
    print(f"wrote {out / 'results.json'}, {out / 'results.csv'} and {len(paths)} figures in {cfg.fig_dir}/ "
          f"({seconds['total']:.0f}s, {seconds['cpu']:.0f} CPU-seconds)")
    return results


def mean_sd(values):
    """[mean, sample standard deviation] of a list of numbers (sd 0 for one number); None if any is missing."""
    if any(v is None for v in values):
        return None
    return [float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0]


def over_seeds(cfg, argv):
    """--seeds: the study once per seed (the first in out_dir itself, the others in out_dir/seed_<s>, each with its
    own base/target/retrain; the data are the same), then every number's mean ± sample sd over the seeds:
    out_dir/seeds.json, and Table 1 with its spreads, printed."""
    seeds, t0 = [int(s) for s in cfg.seeds.split(",")], time.time()
    runs = [main([*argv, "--seeds", "", "--seed", str(s)] + ([] if i == 0 else [
        "--out_dir", str(Path(cfg.out_dir) / f"seed_{s}"), "--fig_dir", ""])) for i, s in enumerate(seeds)]
    by = {}
    for run in runs:
        for r in run["rows"]:
            by.setdefault((r["model"], r["precision"]), []).append(r)
    rows = [dict(model=m, precision=p, **{k: mean_sd([r[k] for r in rs]) for k, v in rs[0].items()
                                          if isinstance(v, (int, float)) and not isinstance(v, bool)})
            for (m, p), rs in by.items()]
    retained = {p: {g: {k: mean_sd([run["retained"][p][g][k] for run in runs]) for k in RETAINED} for g in groups}
                for p, groups in runs[0]["retained"].items()}
    meta = dict(seeds=seeds, seconds=round(time.time() - t0, 1), precisions=runs[0]["meta"]["precisions"],
                machine=runs[0]["meta"]["machine"], settings=runs[0]["meta"]["settings"])
    results = plain(dict(meta=meta, retained=retained, rows=rows))
    M.write_json(Path(cfg.out_dir) / "seeds.json", results)
    print(f"\nTable 1 over seeds {seeds} (mean ± sample sd)")
    report(results)
    return results


def report(results):
    """The paper's Table 1 layout (SPEC §7) at fp32 and the first 4-bit precision, then the retained summary. A
    number is a float, or [mean, sd] over seeds (out/seeds.json)."""
    rows, precs = results["rows"], results["meta"]["precisions"]
    shown = ["fp32"] + [p for p in precs if p.endswith("4")][:1]

    def fmt(v, scale=1):
        if v is None:
            return f"{'n/a':>12}"
        return f"{scale * v[0]:7.1f} ±{scale * v[1]:4.1f}" if isinstance(v, list) else f"{scale * v:12.1f}"
    print(f"{'model':<14}{'precision':<10}" + "".join(f"{h:>12}" for h in (
        "VerbMem", "KnowMem", "PrivLeak", "KnowMem-ret", "exact %", "ppl")))
    for r in rows:
        if r["precision"] in shown:
            print(f"{r['model']:<14}{r['precision']:<10}" + "".join(fmt(r[k]) for k in (
                "verbmem_forget", "knowmem_forget", "privleak", "knowmem_retain")) +
                  fmt(r["forget_exact"], 100) + fmt(r["holdout_ppl"]))
    for p, groups in results["retained"].items():
        print(f"retained % at {p:<6}" + " | ".join(
            f"{g}: VerbMem {fmt(v['verbmem_forget']).strip()}, KnowMem {fmt(v['knowmem_forget']).strip()}, "
            f"exact {fmt(v['forget_exact']).strip()}" for g, v in groups.items()))


# ----------------------------------------------------------------------------------------------------------------
# figures 1-5 of SPEC §6, from a results dict (out/results.json)

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
    methods = [m for m in models if m in SCRIPTS]
    color = {"target": "black", "retrain": "grey", **{m: plt.cm.tab20(i % 20) for i, m in enumerate(methods)}}
    low = next((p for p in precs if p.endswith("4")), precs[-1])  # the 4-bit precision of figures 3 and 4
    both, paths = list(dict.fromkeys(["fp32", low])), []

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

    shown = [p for p in precs if p == "fp32" or p.endswith("4")]  # 2. retained %, full precision vs 4-bit
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
    return paths


# ----------------------------------------------------------------------------------------------------------------
# the sweep: when does quantization bring unlearned text back? (issue 6; SPEC §6 figure 6 and §8)

SWEEP_PRECISIONS = "fp32,int8,rtn4,rtn4_asym,rtn4_g64,gptq4,nf4,fp4"
FOUR_BIT = ("rtn4", "rtn4_asym", "rtn4_g64", "gptq4", "nf4", "fp4")
LRS = ("3e-5", "1e-4", "3e-4", "1e-3")  # the learning-rate grid, 100 steps each
REFERENCES = (("float32", ""), ("bfloat16", "--lr 1e-4 --steps 100"))  # the default study, and pure bf16 where
# only part of the weights move (SPEC §8); the other axes and the seeds vary one thing from each of them
FINDING2 = ("ga", "sga", "tau")
PAPER_RECOVERY = 83 - 21  # points: the paper's retained knowledge at 4 bits minus at full precision
SWEEP = [  # (axis, model.py settings of the target, seed, --dtype, settings of the unlearning scripts, methods)
    *[("lr", "", 1337, d, f"--lr {lr} --steps 100", CONSTRAINED) for d, _ in REFERENCES for lr in LRS],
    *[("lr 3e-5, 300 steps", "", 1337, d, "--lr 3e-5 --steps 300", CONSTRAINED) for d, _ in REFERENCES],  # SPEC §8
    *[("seed", "", s, d, u, CONSTRAINED + SURE + FINDING2) for d, u in REFERENCES for s in (1337, 1338, 1339)],
    *[(axis, t, 1337, d, f"{u} {extra}".strip(), CONSTRAINED) for d, u in REFERENCES for axis, t, extra in (
        ("alpha 3", "", "--alpha 3"), ("no base", "--base_steps 0", ""), ("base x10", "--base_steps 1000", ""),
        ("width 256", "--n_embd 256", ""), ("bf16 target", "--dtype bfloat16", ""))]]


def slug(args):
    """A directory name for command-line settings: '--lr 1e-4 --steps 100' -> 'lr_1e-4_steps_100'; past 80
    characters, the first 64 and a hash of the whole."""
    name = re.sub(r"[^\w.-]+", "_", args.replace("--", " ").strip()) or "default"
    return name if len(name) <= 80 else f"{name[:64]}_{hashlib.sha1(args.encode()).hexdigest()[:12]}"


def sweep(cfg, conditions=SWEEP):
    """The study once per condition, in out_dir/sweep/<target settings>/<unlearning settings>/ beside a target and
    retrain trained once per target settings (linked in); conditions measured before are read back from their rows.
    Writes out_dir/sweep.json (every condition's rows and retained %, and the headline over seeds) and
    fig_dir/6_when.png."""
    root, t0, conds = Path(cfg.out_dir) / "sweep", time.time(), []
    for i, (axis, train_args, seed, dtype, unlearn_args, methods) in enumerate(conditions):
        tdir = root / slug(f"{train_args} --seed {seed}")
        if not all((tdir / f).exists() for f in ("target.pt", "retrain.pt")):
            argv = shlex.split(train_args) + ["--out_dir", str(tdir), "--seed", str(seed), "--device", cfg.device]
            logged(tdir / "logs" / "train.log", M.train_all, *M.cli("", M.TrainConfig, DataConfig, argv=argv))
        cdir = tdir / slug(f"{dtype} {unlearn_args}")
        cdir.mkdir(parents=True, exist_ok=True)
        for f in ("target.pt", "retrain.pt", "train.json", "data"):
            if not (cdir / f).is_symlink():
                (cdir / f).symlink_to(Path("..") / f)
        argv = ["--out_dir", str(cdir), "--fig_dir", "", "--methods", ",".join(methods), "--precisions",
                SWEEP_PRECISIONS, "--seed", str(seed), "--device", cfg.device, "--workers", str(cfg.workers),
                "--el_stride", "0", "--dtype", dtype, "--unlearn_args", unlearn_args]
        res = logged(cdir / "logs" / "study.log", main, argv)
        conds.append(dict(axis=axis, train_args=train_args, seed=seed, dtype=dtype, unlearn_args=unlearn_args,
                          dir=str(cdir.relative_to(root)), retained=res["retained"], rows=res["rows"]))
        got = {p: res["retained"][p].get("constrained", {}).get("verbmem_forget") for p in ("fp32", "int8", "rtn4")}
        moved, back, kept = (mech_mean(conds[-1], k) for k in ("mech_moved", "mech_same_moved", "mech_kept"))
        print(f"[{time.time() - t0:5.0f}s] {i + 1}/{len(conditions)} {axis}: {dtype} {unlearn_args or 'defaults'}, "
              f"target {train_args or 'defaults'}, seed {seed} | retained VerbMem % " + " ".join(
                  f"{p} {'n/a' if v is None else f'{v:.0f}'}" for p, v in got.items())
              + f" | rtn4: moved {moved:.0%}, of them back {back:.0%}, update kept {kept:.2f}", flush=True)
    results = plain(dict(meta=dict(settings=asdict(cfg), precisions=SWEEP_PRECISIONS.split(","),
                                   seconds=round(time.time() - t0, 1), machine=dict(
                                       platform=platform.platform(), cpu_count=os.cpu_count())),
                         headline=headline(conds), conditions=conds))
    M.write_json(Path(cfg.out_dir) / "sweep.json", results)
    sweep_report(results)
    if cfg.fig_dir:
        figure6(results, cfg.fig_dir)
    print(f"wrote {Path(cfg.out_dir) / 'sweep.json'} and {Path(cfg.fig_dir) / '6_when.png'} "
          f"({results['meta']['seconds']:.0f}s)")
    return results


def mech_mean(cond, key, precision="rtn4"):
    """The mean over the utility-constrained methods of a mechanism statistic of a sweep condition."""
    return float(np.mean([r.get(key, np.nan) for r in cond["rows"]
                          if r["model"] in CONSTRAINED and r["precision"] == precision]))


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
        f2 = {m: {k: mean_sd([by[m, "fp32"][k] for by in rows]) for k in (
            "outliers_low", "outliers_high", "forget_exact", "extraction_top_k", "forget_ma")}
              for m in ("target", *FINDING2, *CONSTRAINED, *SURE) if (m, "fp32") in rows[0]}
        out[dtype] = dict(seeds=[c["seed"] for c in seeds], retained=ret, finding2=f2)
    return out


def sweep_report(results):
    """The headline over seeds as markdown tables: retained % per precision for each reference, and finding 2."""
    ms = lambda v, scale=1, f=".1f": "n/a" if v is None else f"{scale * v[0]:{f}} ± {scale * v[1]:{f}}"
    for dtype, h in results["headline"].items():
        groups = list(h["retained"]["fp32"])
        label = dict(verbmem_forget="VerbMem", knowmem_forget="KnowMem", forget_exact="exact")
        print(f"\nretained % ({dtype} reference, seeds {h['seeds']}, mean ± sd)\n\n| precision | " + " | ".join(
            f"{g} {label[k]}" for g in groups for k in RETAINED) + " |\n" + "|---" * (1 + 3 * len(groups)) + "|")
        for p, r in h["retained"].items():
            print(f"| {p} | " + " | ".join(ms(r[g][k]) for g in groups for k in RETAINED) + " |")
        print("\n| method (fp32) | MA ≤ 0.15 | MA ≥ 0.60 | extracted % | top-10 extracted % | mean MA |\n"
              + "|---" * 6 + "|")
        for m, r in h["finding2"].items():
            print(f"| {m} | {ms(r['outliers_low'])} | {ms(r['outliers_high'])} | {ms(r['forget_exact'], 100)} | "
                  f"{ms(r['extraction_top_k'], 100)} | {ms(r['forget_ma'], f='.2f')} |")


def figure6(results, fig_dir="figures"):
    """Figure 6 of SPEC §6 from a sweep dict (out/sweep.json): recovery (retained VerbMem % at a precision minus at
    full precision, mean of the utility-constrained methods) against the learning rate per weight dtype and
    quantizer; retained % itself; the mechanism at rtn4; the other axes; the seeds' headline."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    conds, dtypes = results["conditions"], [d for d, _ in REFERENCES]
    ret = lambda c, p, g="constrained": np.nan if c["retained"].get(p, {}).get(g, {}).get(
        "verbmem_forget") is None else c["retained"][p][g]["verbmem_forget"]
    rec = lambda c, p: ret(c, p) - ret(c, "fp32")
    grid = {d: sorted((float(re.search(r"--lr (\S+)", c["unlearn_args"]).group(1)), c) for c in conds
                      if c["axis"] == "lr" and c["dtype"] == d) for d in dtypes}
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
        for p, color in (("fp32", "tab:blue"), ("rtn4", "tab:red")):
            axes[0, 2].plot([lr for lr, _ in grid[d]], [ret(c, p) for _, c in grid[d]], marker="o", ls=ls,
                            color=color, label=f"{d}, {'full precision' if p == 'fp32' else p}")
        for key, marker, color, what in (
                ("mech_moved", "o", "tab:green", "share of weights moved"),
                ("mech_same_moved", "s", "tab:purple", "moved ones back on the target's rtn4 code"),
                ("mech_kept", "^", "tab:orange", "update kept by rounding, ⟨Q(θ_u) − Q(θ_o), δ⟩ / |δ|²")):
            axes[1, 0].plot([lr for lr, _ in grid[d]], [mech_mean(c, key) for _, c in grid[d]], marker=marker,
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
    shown, bars = ["fp32", "int8", *FOUR_BIT], []
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
    axes[1, 2].legend(fontsize=8, ncol=2, loc="upper right")
    fig.suptitle("6. When does quantization bring unlearned text back? (utility-constrained GA/NPO, mean of 4)")
    return save_png(fig, Path(fig_dir) / "6_when.png")


if __name__ == "__main__":
    main()
