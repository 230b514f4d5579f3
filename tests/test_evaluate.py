import copy
import csv
import itertools
import json
import math
import shutil
import time
from types import SimpleNamespace

import matplotlib.image
import pytest
import torch

import evaluate as ev
from data.prepare import Seqs
from model import GPT, GPTConfig, block_linears, score


def test_rouge_l_hand_examples():
    toks = ev.rouge_tokens("The cat, sat on-the MAT!")
    assert toks == ["the", "cat", "sat", "on", "the", "mat"]
    assert ev.rouge_l_f1(toks, toks) == 1.0
    assert ev.rouge_l_f1(["a", "b"], ["c", "d"]) == 0.0
    assert ev.rouge_l_f1([], ["a"]) == 0.0
    # pred a b c d, ref a c e: LCS = "a c" = 2, P = 2/4, R = 2/3, F1 = 2·(1/2)(2/3)/(1/2 + 2/3) = 4/7
    assert ev.rouge_l_f1(list("abcd"), list("ace")) == pytest.approx(4 / 7)


def test_auc_is_the_mann_whitney_count():
    pos, neg = [3.0, 2.0, 2.0, 1.0, 0.5], [2.0, 1.0, 0.0, 2.0]
    u = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    assert ev.auc(pos, neg) == pytest.approx(u / (len(pos) * len(neg)))
    assert ev.auc([1.0, 2.0], [0.0]) == 1.0 and ev.auc([0.0], [1.0, 2.0]) == 0.0
    assert ev.auc([1.0, 1.0], [1.0]) == 0.5


def test_min_k_prob_on_a_toy():
    lp = torch.tensor([[-1.0, -5.0, -2.0, -4.0, -3.0], [-0.1, -9.0, -0.2, -0.3, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0]], dtype=torch.bool)
    # row 0: floor(0.4·5) = 2 lowest are −5, −4 → −4.5; row 1: 3 valid, floor(1.2) = 1 lowest → −0.3
    assert ev.min_k_prob(lp, mask).tolist() == pytest.approx([-4.5, -0.3])
    assert ev.min_k_prob(lp, mask, k=1.0)[0].item() == pytest.approx(-3.0)


def test_privleak_sign():
    assert ev.privleak(0.5, 0.5) == 0.0
    assert ev.privleak(0.0, 0.5) == -100.0  # forget set still looks trained on
    assert torch.isnan(torch.tensor(ev.privleak(0.3, 0.0)))


def test_outlier_counts_and_holdout_bounds():
    ma = [0.0, 0.1, 0.15, 0.3, 0.59, 0.6, 0.9]
    assert ev.outlier_counts(ma) == (3, 2)
    low, high = ev.holdout_bounds(torch.arange(101) / 100)
    assert (low, high) == (pytest.approx(0.05), pytest.approx(0.95))
    assert ev.outlier_counts(ma, low, high) == (1, 0)


def test_ngram_overlap_and_ranked_extraction():
    assert ev.ngram_overlap([1, 2, 3, 4], [9, 2, 3, 4], n=2) == pytest.approx(2 / 3)
    assert ev.ngram_overlap([1], [1], n=2) == 0.0
    # mean log-probs −1, −0.5, −2: the top 2 are sequences 1 and 0, of which one is extracted
    assert ev.ranked_extraction([-10.0, -5.0, -20.0], [10, 10, 10], [True, False, True], k=2) == 0.5


def test_retained_pct():
    assert ev.retained_pct(21.0, 100.0) == pytest.approx(21.0)
    assert torch.isnan(torch.tensor(ev.retained_pct(5.0, 0.0)))


def test_outlier_auc():
    # holdout mean 0.5; forget distances (0.5, 0.5) all exceed holdout's (0.1, 0, 0.1)
    assert ev.outlier_auc([0.0, 1.0], [0.4, 0.5, 0.6]) == 1.0
    assert ev.outlier_auc([0.4, 0.5, 0.6], [0.4, 0.5, 0.6]) == 0.5


# -----------------------------------------------------------------------------
# on a tiny random GPT

def tiny_gpt(seed=0, T=10, V=30):
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=2, n_embd=16)).eval()


def own_and_random(model, n=4, T=10, V=30):
    """n sequences that are the model's own greedy continuation of a random first token (so greedy decoding
    reproduces them from any prefix), then n random ones; lengths T and T-3, prefix 4."""
    start = torch.randint(1, V, (n, 1))
    x = torch.cat([model.generate(start, T - 1), torch.randint(1, V, (n, T))])
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
        assert s["exact"][i].item() == torch.equal(model.generate(x[None, :p], n - p)[0], x[:n])
    assert s["exact"][:2].all() and not s["exact"][2:].any()


def test_verbmem_and_el_on_own_continuations():
    model = tiny_gpt()
    seqs = own_and_random(model)
    own, rand = seqs.select(range(4)), seqs.select(range(4, 8))
    decode = lambda ids: " ".join(f"w{i}" for i in ids)
    assert ev.verbmem(model, own, decode) == pytest.approx(100.0)
    assert ev.verbmem(model, own, decode, prefix_len=2, n_continue=5) == pytest.approx(100.0)
    assert ev.verbmem(model, rand, decode) < 50
    assert ev.el_n(model, own, n=3, stride=1).tolist() == pytest.approx([1.0] * 4)
    # EL_n on random text, stride 1, against the definition written out: mean over t of OVERLAP_n
    n, el = 3, ev.el_n(model, rand, n=3, stride=1)
    for i in range(2):
        L, x = rand.length[i].item(), rand.x[i].tolist()
        ov = [ev.ngram_overlap(model.generate(torch.tensor([x[:t]]), L - t)[0, t:].tolist(), x[t:L], n)
              for t in range(1, L - n + 1)]
        assert el[i].item() == pytest.approx(sum(ov) / len(ov))
    assert ev.greedy(model, [[1, 2], [3], [4, 5]], [3, 1, 2]) == [
        model.generate(torch.tensor([p]), k)[0, len(p):].tolist() for p, k in [([1, 2], 3), ([3], 1), ([4, 5], 2)]]


def test_privleak_by_hand_and_its_auc_orientation():
    # (AUC_u - AUC_r) / AUC_r * 100: an unlearned model whose forget set still looks trained on (AUC 0.3) against
    # a retrain model at 0.5 is -40; one pushed past unseen text (0.6) is +20; no ratio without a retrain AUC
    assert ev.privleak(0.3, 0.5) == pytest.approx(-40.0) and ev.privleak(0.6, 0.5) == pytest.approx(20.0)
    assert math.isnan(ev.privleak(0.4, 0.0))
    model = tiny_gpt()
    seqs = own_and_random(model)
    own, rand = seqs.select(range(4)), seqs.select(range(4, 8))
    # the model's own greedy continuations are likelier than random text: as forget they look trained on (AUC 0),
    # as holdout they make the forget set look unseen (AUC 1); MUSE's orientation, P(s(holdout) > s(forget))
    assert ev.mia_auc(model, own, rand) == 0.0 and ev.mia_auc(model, rand, own) == 1.0
    assert ev.privleak(ev.mia_auc(model, own, rand), 0.5) == -100.0


class AnswerParis:
    """A stand-in model whose next token depends only on the current one, so that after "Answer:" greedy decoding
    spells ' Paris' and a newline, whatever came before."""
    def __init__(self, encode, V=60):
        self.config, self.transformer = GPTConfig(block_size=50), SimpleNamespace(h=[])
        self.table = torch.zeros(V, dtype=torch.long)
        for a, b in zip(encode(": Paris"), encode(" Paris\n")):
            self.table[a] = b

    def parameters(self):
        return iter([torch.zeros(1)])

    def __call__(self, idx, caches=None, pos0=0):
        return torch.nn.functional.one_hot(self.table[idx], len(self.table)).float(), None


def test_knowmem_prompt_and_score():
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ?:\n"))
    encode, decode = (lambda s: [chars.index(c) + 1 for c in s]), (lambda ids: "".join(chars[i - 1] for i in ids))
    qa = {"forget": [dict(question="A?", answer="Paris"), dict(question="B?", answer="Rome")],
          "holdout": [dict(question="C?", answer="x"), dict(question="D?", answer="y")]}
    data = SimpleNamespace(qa=qa, encode=encode, decode=decode)
    assert ev.knowmem(AnswerParis(encode), data, "forget", n_shots=2, max_answer_tokens=7) == pytest.approx(50.0)
    # a shot is 23 characters, the question 20: 50 - 7 leaves room for one shot, the later one
    prompt = decode(ev.knowmem_prompts(data, "forget", 43, n_shots=2)[0])
    assert prompt == "Question: D?\nAnswer: y\nQuestion: A?\nAnswer:"
    assert decode(ev.knowmem_prompts(data, "forget", 43)[0]) == "Question: A?\nAnswer:"  # the default: no shots
    first, second = (decode(p) for p in ev.knowmem_prompts(data, "holdout", 43, n_shots=2))
    assert first == "Question: D?\nAnswer: y\nQuestion: C?\nAnswer:"  # never the one asked
    assert second == "Question: C?\nAnswer: x\nQuestion: D?\nAnswer:"


# -----------------------------------------------------------------------------
# the mechanism

RTN4 = dict(method="rtn", bits=4, group_size=0, sym=True)


def test_mechanism_on_identical_and_crafted_weights():
    theta_o = tiny_gpt()
    for quant in (RTN4, dict(RTN4, group_size=8, sym=False), dict(method="nf4", bits=4, group_size=0, sym=True)):
        m = ev.mechanism(theta_o, copy.deepcopy(theta_o), quant)
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
    m = ev.mechanism(theta_o, theta_u, RTN4)["all"]
    n = m["n"]
    assert m["hist"] == [n - 1, 0, 0, 0, 0, 1]
    assert m["moved"] == pytest.approx(2 / n) and m["same"] == pytest.approx((n - 1) / n)
    assert m["same_moved"] == 0.5
    # the rounded update: 0 for the first weight, exactly 3 steps for the second (3·step is on the grid)
    assert m["kept"] == pytest.approx((0 * 0.1 + 3 * 3) / (0.1 ** 2 + 3 ** 2))
    assert math.isnan(ev.mechanism(theta_o, copy.deepcopy(theta_o), RTN4)["all"]["kept"])
    # every weight moved by ±0.2 of its step: most round back, but the weights sit anywhere in their cells, so on
    # average the rounded update is the update itself
    theta_u, gen = copy.deepcopy(theta_o), torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in block_linears(theta_u).values():
            W = layer.weight
            W += 0.2 * W.abs().amax(1, keepdim=True) / 8 * (2 * torch.randint(0, 2, W.shape, generator=gen) - 1)
    m = ev.mechanism(theta_o, theta_u, RTN4)["all"]
    assert m["moved"] == 1.0 and m["same_moved"] > 0.7 and m["kept"] == pytest.approx(1.0, abs=0.1)
    with pytest.raises(ValueError, match="gptq"):
        ev.mechanism(theta_o, theta_u, dict(RTN4, method="gptq"))


# -----------------------------------------------------------------------------
# the study, end to end on the tiny models of conftest.py

SPEC_KEYS = ("model", "precision", "verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak", "forget_exact",
             "forget_ma", "holdout_ppl", "retain_exact", "retain_ma")  # SPEC §9, and the brief's
MODELS, PRECS = ["target", "retrain", "ga", "npo", "ga_gdr"], ["fp32", "rtn4"]


def study_argv(out, fig, precisions="fp32,rtn4", workers=1):
    return ["--out_dir", str(out), "--fig_dir", str(fig), "--methods", "ga,npo,ga_gdr", "--precisions", precisions,
            "--workers", str(workers)]


@pytest.fixture(scope="module")
def study(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    shutil.copytree(tiny.out_dir, root / "out")
    t = time.time()
    results = ev.main(study_argv(root / "out", root / "fig"))
    return SimpleNamespace(out=root / "out", fig=root / "fig", results=results, seconds=time.time() - t, tiny=tiny)


def test_study_writes_every_key_and_the_figures(study, tmp_path):
    assert study.seconds < 60
    res = json.loads((study.out / "results.json").read_text())
    assert res == study.results
    meta = res["meta"]
    assert meta["seed"] == 1337 and {"python", "torch"} <= set(meta["versions"])
    assert meta["corpora"]["book"] == "file book.txt"
    assert set(meta["seconds"]["methods"]) == {"ga", "npo", "ga_gdr"} and meta["rows_measured"] == 10
    assert {"platform", "cpu_count", "device"} <= set(meta["machine"])
    rows = {(r["model"], r["precision"]): r for r in res["rows"]}
    assert list(rows) == list(itertools.product(MODELS, PRECS))
    for (m, p), r in rows.items():
        assert all(isinstance(r[k], (int, float)) for k in SPEC_KEYS[2:]), (m, p)
        assert 0 <= r["verbmem_forget"] <= 100 and 0 <= r["forget_exact"] <= 1 and r["holdout_ppl"] > 1
        assert len(r["forget_ma_seq"]) == 16 and r["outliers_low"] + r["outliers_high"] <= 16
        assert (r["forget_el"] is None) == (p != "fp32")  # EL_n at full precision only
        assert ("mech_hist" in r) == (m in ("ga", "npo", "ga_gdr") and p == "rtn4")
    for p in PRECS:  # the references: retrain leaks 0 against itself, the target retains 100% of itself
        assert rows["retrain", p]["privleak"] == 0.0 and rows["target", p]["retained_verbmem_forget"] == 100.0
    assert sum(rows["ga", "rtn4"]["mech_hist"]) == pytest.approx(1.0)
    # the same numbers as the training and unlearning scripts measured on the same checkpoints
    assert rows["target", "fp32"]["forget_ma"] == pytest.approx(study.tiny.summary["target"]["forget_ma"])
    ga = json.loads((study.out / "ga.json").read_text())
    assert rows["ga", "fp32"]["forget_exact"] == pytest.approx(ga["forget_exact"])
    with open(study.out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 10 and set(SPEC_KEYS) <= set(table[0])
    pngs = sorted(study.fig.glob("*.png"))
    assert [p.name[0] for p in pngs] == list("12345")
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(p).shape[0] > 100
    # the figures are drawn from results.json alone
    assert [p.read_bytes() for p in ev.figures(res, tmp_path)] == [p.read_bytes() for p in pngs]


def test_bad_names_are_refused_with_the_valid_list(tmp_path):
    with pytest.raises(SystemExit, match="unknown nope; the valid ones are ga,ga_gdr,ga_klr,npo"):
        ev.main(["--out_dir", str(tmp_path / "out"), "--methods", "ga,nope"])
    with pytest.raises(SystemExit, match="unknown int3; the valid ones are fp32,int8,rtn4,gptq4,nf4,fp4"):
        ev.main(["--out_dir", str(tmp_path / "out"), "--precisions", "fp32,int3"])
    assert not (tmp_path / "out").exists()


def test_second_run_reuses_cached_rows(study):
    stamps = {p: p.stat().st_mtime_ns for p in [*study.out.glob("rows/*.json"), *study.out.glob("*.pt")]}
    again = ev.main(study_argv(study.out, study.fig))
    assert again["rows"] == study.results["rows"] and again["meta"]["rows_measured"] == 0
    assert "methods" not in again["meta"]["seconds"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # one more precision: only its rows are measured, in two worker processes
    more = ev.main(study_argv(study.out, study.fig, "fp32,rtn4,int8", workers=2))
    assert more["meta"]["rows_measured"] == 5
    assert [r for r in more["rows"] if r["precision"] != "int8"] == study.results["rows"]


def test_same_seed_same_numbers(study, tmp_path):
    shutil.copytree(study.out, tmp_path / "out")
    forced = ev.main(study_argv(tmp_path / "out", tmp_path / "fig", "fp32") + ["--methods", "ga", "--force"])
    assert forced["meta"]["rows_measured"] == 3 and set(forced["meta"]["seconds"]["methods"]) == {"ga"}
    first = {(r["model"], r["precision"]): r for r in study.results["rows"]}
    for r in forced["rows"]:
        assert r == first[r["model"], r["precision"]]


def test_precision_names_are_quantize_py_names():
    assert all(ev.Q.quant_name(q) == p for p, q in ev.PRECISIONS.items() if q is not None)


def test_a_method_made_with_other_settings_runs_again(study, tmp_path):
    shutil.copytree(study.out, tmp_path / "out")
    argv = study_argv(tmp_path / "out", tmp_path / "fig", "fp32") + ["--methods", "ga"]
    res = ev.main(argv + ["--unlearn_args", "--steps 3"])
    assert set(res["meta"]["seconds"]["methods"]) == {"ga"}
    assert json.loads((tmp_path / "out" / "ga.json").read_text())["steps"] == 3
    assert "methods" not in ev.main(argv + ["--unlearn_args", "--steps 3"])["meta"]["seconds"]
    with pytest.raises(SystemExit, match="--dtype float16: use float32 or bfloat16"):
        ev.main(argv + ["--dtype", "float16"])


def test_slug():
    assert ev.slug("--lr 1e-4 --steps 100") == "lr_1e-4_steps_100"
    assert ev.slug("bfloat16 --book ../x/a b.txt") == "bfloat16_book_.._x_a_b.txt" and ev.slug("") == "default"
    assert len(ev.slug("--n_embd 64 " * 20)) == 77 and ev.slug("--n_embd 64 " * 20) != ev.slug("--n_embd 64 " * 21)


def test_sweep_on_the_tiny_model(tiny, tmp_path):
    """Two conditions of the sweep (a learning rate, and a seed reference in pure bf16) on the tiny target, which is
    linked in as the sweep's target for its settings; then the same sweep again reads everything back."""
    tcfg, dcfg = tiny.cfg, tiny.dcfg
    skip = ("out_dir", "seed", "device", "force", "log_interval")
    train = " ".join(f"--{k} {v}" for c in (tcfg, dcfg) for k, v in vars(c).items() if k not in skip)
    shutil.copytree(tiny.out_dir, tmp_path / "out" / "sweep" / ev.slug(f"{train} --seed 1337"))
    conds = [("lr", train, 1337, "float32", "--lr 1e-3 --steps 4", ("ga_gdr",)),
             ("seed", train, 1337, "bfloat16", "--lr 1e-3 --steps 4", ("ga_gdr", "ga_gdr_sure", "ga", "sga", "tau"))]
    (cfg,) = ev.M.cli("", ev.StudyConfig, argv=["--out_dir", str(tmp_path / "out"), "--fig_dir", str(tmp_path),
                                                 "--workers", "1"])
    res = ev.sweep(cfg, conds)
    assert res == json.loads((tmp_path / "out" / "sweep.json").read_text())
    lr, seed = res["conditions"]
    assert lr["dir"].endswith("float32_lr_1e-3_steps_4") and seed["dir"].endswith("bfloat16_lr_1e-3_steps_4")
    assert {r["model"] for r in lr["rows"]} == {"target", "retrain", "ga_gdr"}
    assert {r["precision"] for r in lr["rows"]} == set(ev.SWEEP_PRECISIONS.split(","))
    assert set(seed["retained"]["rtn4"]) == {"constrained", "sure"}
    head = res["headline"]["bfloat16"]
    assert head["seeds"] == [1337] and set(head["finding2"]) == {"target", "ga", "sga", "tau", "ga_gdr",
                                                                 "ga_gdr_sure"}
    mean, sd = head["retained"]["fp32"]["constrained"]["forget_exact"]
    assert mean == seed["retained"]["fp32"]["constrained"]["forget_exact"] and sd == 0
    unlearned = torch.load(tmp_path / "out" / "sweep" / seed["dir"] / "ga_gdr.pt", weights_only=True)
    assert unlearned["model"]["lm_head.weight"].dtype == torch.bfloat16
    assert (tmp_path / "6_when.png").read_bytes()[:4] == b"\x89PNG"
    rows = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "sweep").rglob("rows/*.json")}
    assert ev.sweep(cfg, conds)["conditions"] == res["conditions"]
    assert {p: p.stat().st_mtime_ns for p in rows} == rows
