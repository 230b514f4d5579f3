"""metrics.py: each metric against a hand computation or its definition written out."""
import copy
import itertools
import math
from types import SimpleNamespace

import pytest
import torch

import metrics
import quantizers
import model as M
from data.prepare import Seqs
from model import GPT, GPTConfig, block_linears, score


def test_rouge_l_hand_examples():
    toks = metrics.rouge_tokens("The cat, sat on-the MAT!")
    assert toks == ["the", "cat", "sat", "on", "the", "mat"]
    assert metrics.rouge_l_f1(toks, toks) == 1.0
    assert metrics.rouge_l_f1(["a", "b"], ["c", "d"]) == 0.0
    assert metrics.rouge_l_f1([], ["a"]) == 0.0
    # pred a b c d, ref a c e: LCS = "a c" = 2, P = 2/4, R = 2/3, F1 = 2·(1/2)(2/3)/(1/2 + 2/3) = 4/7
    assert metrics.rouge_l_f1(list("abcd"), list("ace")) == pytest.approx(4 / 7)


def test_auc_is_the_mann_whitney_count():
    pos, neg = [3.0, 2.0, 2.0, 1.0, 0.5], [2.0, 1.0, 0.0, 2.0]
    u = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    assert metrics.auc(pos, neg) == pytest.approx(u / (len(pos) * len(neg)))
    assert metrics.auc([1.0, 2.0], [0.0]) == 1.0 and metrics.auc([0.0], [1.0, 2.0]) == 0.0
    assert metrics.auc([1.0, 1.0], [1.0]) == 0.5


def test_min_k_prob_on_a_toy():
    lp = torch.tensor([[-1.0, -5.0, -2.0, -4.0, -3.0], [-0.1, -9.0, -0.2, -0.3, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    # row 0: floor(0.4·5) = 2 lowest are −5, −4 → −4.5; row 1: 3 valid, floor(1.2) = 1 lowest → −0.3
    assert metrics.min_k_prob(lp, mask).tolist() == pytest.approx([-4.5, -0.3])
    assert metrics.min_k_prob(lp, mask, k=1.0)[0].item() == pytest.approx(-3.0)


def test_privleak_sign():
    assert metrics.privleak(0.5, 0.5) == 0.0
    assert metrics.privleak(0.0, 0.5) == -100.0  # forget set still looks trained on
    assert torch.isnan(torch.tensor(metrics.privleak(0.3, 0.0)))


def test_outlier_counts_and_holdout_bounds():
    ma = [0.0, 0.1, 0.15, 0.3, 0.59, 0.6, 0.9]
    assert metrics.outlier_counts(ma) == (3, 2)
    low, high = metrics.holdout_bounds(torch.arange(101) / 100)
    assert (low, high) == (pytest.approx(0.05), pytest.approx(0.95))
    assert metrics.outlier_counts(ma, low, high) == (1, 0)


def test_ngram_overlap_and_ranked_extraction():
    assert metrics.ngram_overlap([1, 2, 3, 4], [9, 2, 3, 4], n=2) == pytest.approx(2 / 3)
    assert metrics.ngram_overlap([1], [1], n=2) == 0.0
    # mean log-probs −1, −0.5, −2: the top 2 are sequences 1 and 0, of which one is extracted
    assert metrics.ranked_extraction([-10.0, -5.0, -20.0], [10, 10, 10], [True, False, True], k=2) == 0.5


def test_recovered_share_by_hand():
    # unlearned 20 at full precision, the target 80 after quantization: back to 50 is half the gap (50), to 80 all of
    # it (100), staying at 20 none, going below 20 negative; no gap, or one under 10% of the target's 80, no share
    assert metrics.recovered_share(50.0, 20.0, 80.0) == pytest.approx(50.0)
    assert metrics.recovered_share(80.0, 20.0, 80.0) == pytest.approx(100.0)
    assert metrics.recovered_share(20.0, 20.0, 80.0) == 0.0 and metrics.recovered_share(14.0, 20.0, 80.0) == -10.0
    assert math.isnan(metrics.recovered_share(30.0, 90.0, 80.0)) and math.isnan(metrics.recovered_share(76, 75, 80))


def test_excess_retained_by_hand():
    # target 90, retrain 40 at the same precision: an unlearned 40 is as clean as retrain (0), 65 keeps half
    # the target's excess (50), 90 all of it (100); below retrain goes negative; no excess, no share
    assert metrics.excess_retained(40.0, 90.0, 40.0) == pytest.approx(0.0)
    assert metrics.excess_retained(65.0, 90.0, 40.0) == pytest.approx(50.0)
    assert metrics.excess_retained(90.0, 90.0, 40.0) == pytest.approx(100.0)
    assert metrics.excess_retained(30.0, 90.0, 40.0) == pytest.approx(-20.0)
    assert math.isnan(metrics.excess_retained(50.0, 40.0, 40.0))
    # a gap of 3 points under a target of 60 is below the floor (10% of 60 = 6): not read; 7 points are
    assert math.isnan(metrics.excess_retained(50.0, 60.0, 57.0))
    assert metrics.excess_retained(56.5, 60.0, 53.0) == pytest.approx(50.0)


def test_retained_pct():
    assert metrics.retained_pct(21.0, 100.0) == pytest.approx(21.0)
    assert torch.isnan(torch.tensor(metrics.retained_pct(5.0, 0.0)))


def test_recovery_law_by_hand():
    assert metrics.predicted_retained(40.0, 1.0) == 40.0  # the whole update survives rounding: nothing comes back
    assert metrics.predicted_retained(40.0, 0.0) == 100.0  # rounding erases it: the target's knowledge returns
    assert metrics.predicted_retained(40.0, 0.25) == pytest.approx(85.0)  # 60 removed, a quarter of it stays
    # a target whose metric quantization halves (80 -> 40): the unlearned model fell from 80 to 20 (retained 25%);
    # half of its update survives rounding, so it sits 30 below the quantized target's 40, at 10: 25% of it again
    assert metrics.predicted_retained(25.0, 0.5, scale=80 / 40) == pytest.approx(100 * 10 / 40)


def test_outlier_auc():
    # holdout mean 0.5; forget distances (0.5, 0.5) all exceed holdout's (0.1, 0, 0.1)
    assert metrics.outlier_auc([0.0, 1.0], [0.4, 0.5, 0.6]) == 1.0
    assert metrics.outlier_auc([0.4, 0.5, 0.6], [0.4, 0.5, 0.6]) == 0.5


# -----------------------------------------------------------------------------
# on a tiny random GPT

def generate(model, idx, n):
    """idx (B, t) followed by its greedy continuation of n tokens, as one tensor."""
    return torch.cat([idx, torch.tensor(M.greedy(model, idx.tolist(), [n] * len(idx)))], 1)


def tiny_gpt(seed=0, T=10, V=30):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=2, n_embd=16)).eval()


def own_and_random(model, n=4, T=10, V=30):
    """n sequences that are the model's own greedy continuation of a random first token (so greedy decoding
    reproduces them from any prefix), then n random ones; lengths T and T-3, prefix 4."""
    start = torch.randint(1, V, (n, 1))
    x = torch.cat([generate(model, start, T - 1), torch.randint(1, V, (n, T))])
    length = torch.tensor([T, T - 3] * n)
    return Seqs(x * (torch.arange(T) < length[:, None]), length, torch.full((2 * n,), 4),
                torch.ones(2 * n, dtype=torch.long), ["book"] * 2 * n, [""] * 2 * n)


def test_ma_and_exact_from_one_pass_equal_step_by_step_greedy():
    model = tiny_gpt()
    seqs = own_and_random(model, n=2)
    s = score(model, seqs)
    for i in range(len(seqs)):
        n, p, x = seqs.length[i].item(), seqs.prefix[i].item(), seqs.x[i]
        hits = [model(x[None, :t])[0][0, -1].argmax().item() == x[t].item() for t in range(1, n)]
        assert s["ma"][i].item() == pytest.approx(sum(hits) / len(hits))
        assert s["exact"][i].item() == torch.equal(generate(model, x[None, :p], n - p)[0], x[:n])
    assert s["exact"][:2].all() and not s["exact"][2:].any()


def test_verbmem_and_el_on_own_continuations():
    model = tiny_gpt()
    seqs = own_and_random(model)
    own, rand = seqs.select(range(4)), seqs.select(range(4, 8))
    decode = lambda ids: " ".join(f"w{i}" for i in ids)
    assert metrics.verbmem(model, own, decode) == pytest.approx(100.0)
    assert metrics.verbmem(model, own, decode, prefix_len=2, n_continue=5) == pytest.approx(100.0)
    assert metrics.verbmem(model, rand, decode) < 50
    assert metrics.el_n(model, own, n=3, stride=1).tolist() == pytest.approx([1.0] * 4)
    # EL_n on random text, stride 1, against the definition written out: mean over t of OVERLAP_n
    n, el = 3, metrics.el_n(model, rand, n=3, stride=1)
    for i in range(2):
        L, x = rand.length[i].item(), rand.x[i].tolist()
        ov = [metrics.ngram_overlap(generate(model, torch.tensor([x[:t]]), L - t)[0, t:].tolist(), x[t:L], n)
              for t in range(1, L - n + 1)]
        assert el[i].item() == pytest.approx(sum(ov) / len(ov))
    assert M.greedy(model, [[1, 2], [3], [4, 5]], [3, 1, 2]) == [
        generate(model, torch.tensor([p]), k)[0, len(p):].tolist() for p, k in [([1, 2], 3), ([3], 1), ([4, 5], 2)]]


def test_privleak_by_hand_and_its_auc_orientation():
    # (AUC_u - AUC_r) / AUC_r * 100: an unlearned model whose forget set still looks trained on (AUC 0.3) against
    # a retrain model at 0.5 is -40; one pushed past unseen text (0.6) is +20; no ratio without a retrain AUC
    assert metrics.privleak(0.3, 0.5) == pytest.approx(-40.0) and metrics.privleak(0.6, 0.5) == pytest.approx(20.0)
    assert math.isnan(metrics.privleak(0.4, 0.0))
    model = tiny_gpt()
    seqs = own_and_random(model)
    own, rand = seqs.select(range(4)), seqs.select(range(4, 8))
    # the model's own greedy continuations are likelier than random text: as forget they look trained on (AUC 0),
    # as holdout they make the forget set look unseen (AUC 1); MUSE's orientation, P(s(holdout) > s(forget))
    assert metrics.mia_auc(model, own, rand) == 0.0 and metrics.mia_auc(model, rand, own) == 1.0
    assert metrics.privleak(metrics.mia_auc(model, own, rand), 0.5) == -100.0


class AnswerParis:
    """A stand-in model whose next token depends only on the current one, so that after "Answer:" greedy decoding
    spells ' Paris' and a newline, whatever came before."""
    def __init__(self, encode, V=60):
        self.config = GPTConfig(block_size=50)
        self.table = torch.zeros(V, dtype=torch.long)
        for a, b in zip(encode(": Paris"), encode(" Paris\n")):
            self.table[a] = b

    def parameters(self):
        return iter([torch.zeros(1)])

    def new_cache(self):  # greedy() asks for one; this model needs none
        return None

    def __call__(self, idx, caches=None, pos0=0):
        return torch.nn.functional.one_hot(self.table[idx], len(self.table)).float(), None


def test_knowmem_prompt_and_score():
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ?:\n"))
    encode, decode = (lambda s: [chars.index(c) + 1 for c in s]), (lambda ids: "".join(chars[i - 1] for i in ids))
    qa = {"forget": [dict(question="A?", answer="Paris"), dict(question="B?", answer="Rome")],
          "holdout": [dict(question="C?", answer="x"), dict(question="D?", answer="y")]}
    data = SimpleNamespace(qa=qa, encode=encode, decode=decode)
    assert metrics.knowmem(AnswerParis(encode), data, "forget", n_shots=2, max_answer_tokens=7) == pytest.approx(50.0)
    # a shot is 23 characters, the question 20: 50 - 7 leaves room for one shot, the later one
    prompt = decode(metrics.knowmem_prompts(data, "forget", 43, n_shots=2)[0])
    assert prompt == "Question: D?\nAnswer: y\nQuestion: A?\nAnswer:"
    assert decode(metrics.knowmem_prompts(data, "forget", 43)[0]) == "Question: A?\nAnswer:"  # the default: no shots
    first, second = (decode(p) for p in metrics.knowmem_prompts(data, "holdout", 43, n_shots=2))
    assert first == "Question: D?\nAnswer: y\nQuestion: C?\nAnswer:"  # never the one asked
    assert second == "Question: C?\nAnswer: x\nQuestion: D?\nAnswer:"


# -----------------------------------------------------------------------------
# the mechanism

RTN4 = dict(method="rtn", bits=4, group_size=0, sym=True)


@pytest.mark.parametrize("quant", [RTN4, dict(RTN4, bits=5, group_size=8, sym=False),
                                   dict(method="fp4", bits=4, group_size=0, sym=True)])
def test_grid_rounds_as_the_quantizer_does(quant):
    """The mechanism's Q(W) is the model's quantized weight itself, and each weight inside its row's levels sits
    within half a step of it (Eq. 2's symmetric grid clips the largest positive weight by a step)."""
    W = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    code, step, rounded = metrics.grid(W, quant)
    Qw, _ = quantizers.quantize_weight(W, quant["method"], quant["bits"], quant["group_size"], quant["sym"])
    assert torch.equal(rounded, Qw) and code.shape == step.shape == W.shape
    inside = (W >= rounded.amin(1, keepdim=True)) & (W <= rounded.amax(1, keepdim=True))
    assert inside.float().mean() > 0.9 and ((W - rounded).abs() <= step / 2 + 1e-6)[inside].all()


def test_mechanism_on_identical_and_crafted_weights():
    theta_o = tiny_gpt()
    for quant in (RTN4, dict(RTN4, group_size=8, sym=False), dict(method="nf4", bits=4, group_size=0, sym=True)):
        m = metrics.mechanism(theta_o, copy.deepcopy(theta_o), quant)
        n = sum(l.weight.numel() for l in block_linears(theta_o).values())
        assert m["all"]["n"] == n and sum(m["all"]["hist"]) == n and m["all"]["hist"][0] == n
        assert m["all"]["same"] == 1.0 and m["all"]["moved"] == 0.0
    # one weight moved by 0.1 step (rounds back to the same code), one by 3 steps (a new code)
    W = block_linears(theta_o)["transformer.h.0.attn.c_attn"].weight
    j = W[0].abs().argsort()[:2]  # two small weights of row 0: the row's absmax and so its step stay put
    with torch.no_grad():
        W[0, j] = 0.0
    theta_u = copy.deepcopy(theta_o)
    step = W[0].abs().max().item() / 8
    with torch.no_grad():
        block_linears(theta_u)["transformer.h.0.attn.c_attn"].weight[0, j] = torch.tensor([0.1, 3.0]) * step
    m = metrics.mechanism(theta_o, theta_u, RTN4)["all"]
    n = m["n"]
    assert m["hist"] == [n - 1, 0, 0, 0, 0, 1]
    assert m["moved"] == pytest.approx(2 / n) and m["same"] == pytest.approx((n - 1) / n)
    assert m["same_moved"] == 0.5
    # the rounded update: 0 for the first weight, exactly 3 steps for the second (3·step is on the grid)
    assert m["kept"] == pytest.approx((0 * 0.1 + 3 * 3) / (0.1 ** 2 + 3 ** 2))
    assert math.isnan(metrics.mechanism(theta_o, copy.deepcopy(theta_o), RTN4)["all"]["kept"])
    # every weight moved by ±0.2 of its step: most round back, but the weights sit anywhere in their cells, so on
    # average the rounded update is the update itself
    theta_u, gen = copy.deepcopy(theta_o), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in block_linears(theta_u).values():
            W = layer.weight
            W += 0.2 * W.abs().amax(1, keepdim=True) / 8 * (2 * torch.randint(0, 2, W.shape, generator=gen) - 1)
    m = metrics.mechanism(theta_o, theta_u, RTN4)["all"]
    assert m["moved"] == 1.0 and m["same_moved"] > 0.7 and m["kept"] == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError, match="gptq"):
        metrics.mechanism(theta_o, theta_u, dict(RTN4, method="gptq"))


def test_update_kept_reads_the_rounded_update_off_the_quantized_models():
    theta_o, gen = tiny_gpt(), torch.Generator().manual_seed(1)
    theta_u = copy.deepcopy(theta_o)
    with torch.no_grad():
        for layer in block_linears(theta_u).values():
            layer.weight += 0.01 * torch.randn(layer.weight.shape, generator=gen)
    assert metrics.update_kept(theta_o, theta_u, theta_o, theta_u) == dict(kept=1.0, moved=1.0)  # Q = identity
    assert metrics.update_kept(theta_o, theta_u, theta_o, theta_o)["kept"] == 0.0  # Q(θ_u) = Q(θ_o)
    half = copy.deepcopy(theta_o)  # Q(θ_u) = θ_o + δ/2 everywhere: half the update survives
    with torch.no_grad():
        for name, layer in block_linears(half).items():
            layer.weight += 0.5 * (block_linears(theta_u)[name].weight - layer.weight)
    assert metrics.update_kept(theta_o, theta_u, theta_o, half)["kept"] == pytest.approx(0.5)
    q_o, q_u = (copy.deepcopy(m) for m in (theta_o, theta_u))  # RTN: the same number as the mechanism's
    for q in (q_o, q_u):
        for layer in block_linears(q).values():
            layer.weight.data = metrics.grid(layer.weight.data, RTN4)[2]
    assert metrics.update_kept(theta_o, theta_u, q_o, q_u)["kept"] == pytest.approx(
        metrics.mechanism(theta_o, theta_u, RTN4)["all"]["kept"], rel=1e-6)


def test_damage_matched_is_the_most_damaging_precision_that_keeps_the_papers_share():
    scores = {"full": 100.0, "int8": 99.9, "rtn6": 88.0, "rtn5": 80.0, "rtn4": 40.0}
    assert metrics.damage_matched(scores) == "rtn6"  # 88 >= 85.47; rtn5's 80 is below it
    assert metrics.damage_matched(scores, keep=0.75) == "rtn5"
    assert metrics.damage_matched({"full": 100.0, "rtn4": 40.0}) is None
    assert abs(metrics.PAPER_KEEP - 0.8547) < 1e-4
