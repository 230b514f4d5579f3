"""The unlearning methods: each loss and selection pinned by a hand computation, the masks shown to leave every
other weight bit-identical, and every method shown to lower forget MA on the tiny setup."""
import importlib
import json
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

import task_arithmetic as ta
import train as T
import unlearn as U
import unlearn_ga as ga
import unlearn_memflex as mf
import unlearn_npo as npo
from data.prepare import Seqs
from model import GPT, GPTConfig, block_linears, load_checkpoint, score


def toy(seed=0, n=6, T=12, V=40):
    """A small random GPT and n sequences of different lengths (prefix 4) in a one-split stand-in for Data."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=2, n_embd=16))
    length = torch.tensor([T - i % 3 for i in range(n)])
    x = torch.randint(1, V, (n, T)) * (torch.arange(T) < length[:, None])
    seqs = Seqs(x, length, torch.full((n,), 4), torch.ones(n, dtype=torch.long), ["book"] * n, [""] * n)
    return model, seqs, SimpleNamespace(split=lambda name: seqs)


def flat_grad(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


# ----------------------------------------------------------------------------------------------------------------
# NPO

def test_npo_loss_on_two_sequences_equals_hand_computation():
    # beta*(logp_theta - logp_ref) = 0.1*(2, -5) = (0.2, -0.5); log sigmoid(-0.2) = -log(1+e^0.2) = -0.7981389,
    # log sigmoid(0.5) = -log(1+e^-0.5) = -0.4740770; -(2/0.1) * their mean = 12.7221585
    loss = npo.npo_loss(torch.tensor([-10.0, -20.0]), torch.tensor([-12.0, -15.0]), beta=0.1)
    assert loss.item() == pytest.approx(12.7221585, abs=1e-5)
    at_ref = npo.npo_loss(torch.tensor([-7.0]), torch.tensor([-7.0]), beta=0.1)
    assert at_ref.item() == pytest.approx(20 * math.log(2))  # at pi_ref: -(2/beta) log(1/2)


def test_seq_logprob_is_the_sum_of_real_token_logprobs():
    model, seqs, _ = toy()
    with torch.no_grad():
        lp = npo.seq_logprob(model, seqs)
    torch.testing.assert_close(lp, score(model, seqs)["logprob"])


def test_npo_gradient_points_as_ga_as_beta_goes_to_zero():
    model, seqs, _ = toy()
    ref = U.frozen(model)
    with torch.no_grad():  # move away from the reference so log pi_theta - log pi_ref differs per sequence
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    g_ga = flat_grad(model, ga.ga_loss(model, seqs))
    cos = {}
    for beta in (1e-3, 3.0):
        g = flat_grad(model, npo.npo_loss(npo.seq_logprob(model, seqs), npo.seq_logprob(ref, seqs), beta))
        cos[beta] = torch.nn.functional.cosine_similarity(g, g_ga, dim=0).item()
    assert cos[1e-3] > 0.99
    assert cos[3.0] < cos[1e-3]  # a large beta reweights the sequences: the limit is not trivial


# ----------------------------------------------------------------------------------------------------------------
# KL regularizer

def test_kl_hand_value_nonnegative_and_zero_at_reference():
    # p_ref = softmax(0, ln 3) = (1/4, 3/4), p_theta = (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.1308120
    ref = torch.tensor([[[0.0, math.log(3)], [5.0, -5.0]]])
    cur = torch.tensor([[[1.0, 1.0], [-5.0, 5.0]]])
    mask = torch.tensor([[True, False]])  # the second position is padding
    assert U.kl_loss(ref, cur, mask).item() == pytest.approx(0.1308120, abs=1e-6)
    torch.manual_seed(0)
    a, b, m = torch.randn(4, 8, 50), torch.randn(4, 8, 50), torch.rand(4, 8) < 0.7
    assert U.kl_loss(a, b, m).item() > 0
    assert U.kl_loss(a, a.clone(), m).item() == 0.0


# ----------------------------------------------------------------------------------------------------------------
# SURE

def test_sure_mask_is_the_top_share_by_saliency():
    sal = {f"w{i}": float(i) for i in range(1, 17)}  # P90 of 1..16 = 1 + 0.9*15 = 14.5
    assert U.sure_mask(sal, 90) == {"w15", "w16"}
    assert U.sure_mask(sal, 0) == set(sal)
    with pytest.raises(ValueError):
        U.sure_mask(sal, 120)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sure_moves_only_its_mask(dtype):
    model, seqs, data = toy()
    model.to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sal = U.saliency(model, seqs, ga.ga_loss)
    cfg, rcfg = U.UnlearnConfig(steps=5, batch_size=4, lr=1e-3), U.RetainConfig("gdr", sure=True, sure_gamma=75)
    model, stats = U.unlearn(model, data, ga.ga_loss, cfg, rcfg)
    mask = set(stats["trained"])
    assert mask == set(sorted(sal, key=sal.get)[-len(mask):]) and len(mask) == 2  # top 25% of 8 matrices
    assert stats["lr"] == pytest.approx(1e-2)
    for k, v in model.state_dict().items():
        moved = not torch.equal(v, before[k])
        assert moved == (k.removesuffix(".weight") in mask), k


# ----------------------------------------------------------------------------------------------------------------
# SGA

def test_sga_selects_memorized_sequences_plus_the_most_memorized():
    ma = torch.tensor([0.2, 0.75, 0.69, 0.9, 0.7])
    assert ga.sga_select(ma, 0.7).tolist() == [1, 3, 4]
    assert ga.sga_select(torch.tensor([0.1, 0.3, 0.2]), 0.7).tolist() == [1]  # none above: the top one only


# ----------------------------------------------------------------------------------------------------------------
# task arithmetic

def test_task_vector_lambda_zero_and_negate_then_add():
    model, _, _ = toy()
    theta = model.state_dict()
    ft = {k: v + 0.01 * torch.randn_like(v) for k, v in theta.items()}
    tau = ta.task_vector(ft, theta)
    assert all(torch.equal(v, theta[k]) for k, v in ta.apply(theta, tau, 0.0).items())
    back = ta.apply(ta.apply(theta, tau, -1.0), tau, 1.0)
    for k, v in back.items():  # identity up to float32 rounding of the two additions
        torch.testing.assert_close(v, theta[k], rtol=0, atol=1e-6)
    for k, v in ta.apply(theta, tau, 1.0).items():
        torch.testing.assert_close(v, ft[k], rtol=0, atol=1e-6)
    bf = {k: v.bfloat16() for k, v in theta.items()}
    assert all(torch.equal(v, bf[k]) for k, v in ta.apply(bf, tau, 0.0).items())
    with pytest.raises(ValueError):
        ta.task_vector({"a": torch.zeros(1)}, {"b": torch.zeros(1)})


# ----------------------------------------------------------------------------------------------------------------
# MemFlex

def test_memflex_localize_on_crafted_gradients():
    gf = {"a": torch.tensor([1.0, 0.0]), "b": torch.tensor([1.0, 1.0]), "c": torch.tensor([0.01, 0.0])}
    gr = {"a": torch.tensor([0.0, 1.0]), "b": torch.tensor([1.0, 1.0]), "c": torch.tensor([0.0, 1.0])}
    sel, stats = mf.localize(gf, gr, mu=0.92, sigma=0.1)
    assert sel == {"a"}  # b: cos 1 >= mu; c: cos 0 but mean |g| 0.005 <= sigma
    assert stats["a"] == pytest.approx((0.0, 0.5)) and stats["b"][0] == pytest.approx(1.0)
    # select: the matrices with the lowest cosines. cos: a 0, b 1, c 0; the 50th percentile is 0
    assert mf.localize(gf, gr, mu=1.0, sigma=0.0, select=50)[0] == {"a", "c"}
    assert mf.localize(gf, gr, mu=1.0, sigma=0.1, select=50)[0] == {"a"}
    assert mf.localize(gf, gr, mu=0.99, sigma=0.0, select=100)[0] == {"a", "c"}  # b: cos 1 is not < mu
    # cos 0, 0.6, 0.8, 1 (retain grad (0.6, 0.8) against four forget grads): the q-th percentile interpolates at
    # 3q between the sorted cosines; q = 25%: 0 + 0.75 * 0.6 = 0.45, q = 50%: 0.6 + 0.5 * 0.2 = 0.7
    gf = {"w": torch.tensor([0.8, -0.6]), "x": torch.tensor([1.0, 0.0]), "y": torch.tensor([0.0, 1.0]),
          "z": torch.tensor([0.6, 0.8])}
    gr = {n: torch.tensor([0.6, 0.8]) for n in gf}
    assert [s for s, _ in mf.localize(gf, gr, 1.0, 0.0)[1].values()] == pytest.approx([0.0, 0.6, 0.8, 1.0])
    assert mf.localize(gf, gr, mu=1.0, sigma=0.0, select=25)[0] == {"w"}
    assert mf.localize(gf, gr, mu=1.0, sigma=0.0, select=50)[0] == {"w", "x"}
    assert mf.localize(gf, gr, mu=0.5, sigma=0.0, select=100)[0] == {"w"}


def test_memflex_randomize_answers_draws_floor_half_answer_positions_with_replacement():
    """KnowUnDo's rule: floor(n/2) draws of an answer position, with replacement, each set to a drawable id. The
    drawable ids (100..109) are none of the sequences' ids, so every drawn position changes and the changed
    positions are the distinct positions drawn: for n = 5 (2 draws) one or two, one with probability 1/5, on average
    5 (1 - (4/5)^2) = 1.8; for n = 2 (1 draw) exactly one; for n = 1 (0 draws) none."""
    x = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 0],    # prefix 2, length 7: n = 5 answer tokens, 2 draws
                      [1, 2, 3, 4, 5, 0, 0, 0],    # prefix 3, length 5: n = 2, 1 draw
                      [1, 2, 3, 4, 5, 6, 7, 1]])   # prefix 7, length 8: n = 1, no draw
    seqs = Seqs(x, torch.tensor([7, 5, 8]), torch.tensor([2, 3, 7]), torch.ones(3, dtype=torch.long), ["book"] * 3,
                [""] * 3)
    ids = torch.arange(100, 110)
    t = torch.arange(8)
    answer = (t >= seqs.prefix[:, None]) & (t < seqs.length[:, None])
    counts = []
    for seed in range(400):
        out = mf.randomize_answers(seqs, 0.5, ids, torch.Generator().manual_seed(seed)).x
        changed = out != x
        assert not changed[~answer].any()  # never the prompt or the padding
        assert ((out[changed] >= 100) & (out[changed] < 110)).all()
        counts.append(changed.sum(1).tolist())
    counts = torch.tensor(counts)  # (seeds, 3) changed positions per sequence
    assert set(counts[:, 0].tolist()) == {1, 2} and (counts[:, 1] == 1).all() and (counts[:, 2] == 0).all()
    assert (counts[:, 0] == 1).float().mean().item() == pytest.approx(0.2, abs=0.06)  # a position drawn twice
    assert counts[:, 0].float().mean().item() == pytest.approx(1.8, abs=0.06)
    same = [mf.randomize_answers(seqs, 0.5, ids, torch.Generator().manual_seed(s)).x for s in (7, 7, 8)]
    assert torch.equal(same[0], same[1]) and not torch.equal(same[0], same[2])  # seeded by the generator alone
    assert torch.equal(mf.randomize_answers(seqs, 0.0, ids, torch.Generator().manual_seed(0)).x, x)


def test_memflex_draws_every_id_but_the_special_ones(tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    assert mf.drawable_ids(SimpleNamespace(vocab=[100257, 5, 9], vocab_size=3)).tolist() == [1, 2]  # 0: <|endoftext|>
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "<eos>": 2, "b": 3},
                                                                              unk_token="[UNK]")),
                                  unk_token="[UNK]", eos_token="<eos>")
    tok.save_pretrained(tmp_path)
    got = mf.drawable_ids(SimpleNamespace(vocab=None, vocab_size=len(tok), config=dict(tokenizer=str(tmp_path))))
    assert got.tolist() == [1, 3]  # a Hugging Face tokenizer's own ids: unk 0 and eos 2 are special


def test_memflex_localization_grads_average_the_copies():
    """With nothing randomized (randomize 0), the copies are all the same and their mean gradient is the gradient of
    answer_ce itself (a sum would be `copies` times it); randomized, it is not."""
    model, seqs, _ = toy()
    ids = torch.arange(1, 40)
    plain = U.block_grads(model, mf.answer_ce(model, seqs))
    mcfg = mf.MemFlexConfig(randomize=0.0, copies=3)
    got = mf.localization_grads(model, seqs, mcfg, ids, torch.Generator().manual_seed(0))
    assert all(torch.allclose(got[n], plain[n], rtol=1e-5, atol=1e-8) for n in plain)
    got = mf.localization_grads(model, seqs, mf.MemFlexConfig(copies=3), ids, torch.Generator().manual_seed(0))
    assert not all(torch.allclose(got[n], plain[n], rtol=1e-3) for n in plain)


def test_memflex_leaves_unselected_matrices_bit_identical():
    model, seqs, data = toy()
    mask = {"transformer.h.1.mlp.c_fc", "transformer.h.0.attn.c_proj"}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model, _ = U.unlearn(model, data, ga.ga_loss, U.UnlearnConfig(steps=4, batch_size=4, lr=1e-3),
                          U.RetainConfig("gdr", 2.0), mask=mask)
    for k, v in model.state_dict().items():
        assert (not torch.equal(v, before[k])) == (k.removesuffix(".weight") in mask), k


def test_answer_ce_is_the_mean_per_sequence_answer_cross_entropy():
    model, seqs, _ = toy()
    with torch.no_grad():
        got = mf.answer_ce(model, seqs)
        per_seq = []
        for i in range(len(seqs)):
            x, p, n = seqs.x[i], seqs.prefix[i].item(), seqs.length[i].item()
            logp = torch.log_softmax(model(x[None, :n - 1])[0][0], -1)
            per_seq.append(-logp[p - 1:n - 1].gather(-1, x[p:n, None]).mean())  # targets x_p .. x_{n-1}
    assert got.item() == pytest.approx(torch.stack(per_seq).mean().item(), rel=1e-5)


def test_memflex_trains_exactly_the_matrices_its_table_selects(tiny, tiny_target):
    """The matrices MemFlex trains are those its printed and saved table selects: with --select 100, those with
    cos < mu (with mu between the two middle cosines, half of them); by default, the quarter with the lowest
    cosines."""
    mf.main(["--out_dir", str(tiny_target), "--steps", "2", "--select", "100", "--mu", "1", "--sigma", "0"])
    table = json.loads((tiny_target / "memflex.json").read_text())["localization"]
    cos = sorted(r["cos"] for r in table.values())
    mu = (cos[len(cos) // 2 - 1] + cos[len(cos) // 2]) / 2  # between the two middle cosines: half are selected
    mf.main(["--out_dir", str(tiny_target), "--steps", "2", "--select", "100", "--mu", str(mu), "--sigma", "0"])
    trained = json.loads((tiny_target / "memflex.json").read_text())["trained"]
    assert len(trained) == len(cos) // 2 and set(trained) == {n for n, r in table.items() if r["cos"] < mu}
    mf.main(["--out_dir", str(tiny_target), "--steps", "2", "--sigma", "0"])  # the default: the lowest quarter
    trained = json.loads((tiny_target / "memflex.json").read_text())["trained"]
    assert set(trained) == {n for n, r in table.items() if r["cos"] <= cos[(len(cos) - 1) // 4]}


def test_nan_loss_stops_with_the_step_and_the_loss():
    model, seqs, data = toy()
    with pytest.raises(SystemExit, match="step 0: the forget loss is nan"):
        U.unlearn(model, data, lambda m, s: ga.ga_loss(m, s) * float("nan"), U.UnlearnConfig(steps=2))


# ----------------------------------------------------------------------------------------------------------------
# every method, through its command line, on the tiny target

FLAGS = {"memflex": ["--sigma", "0"]}  # sigma is KnowUnDo's, for gradients of a larger model than the tiny one


@pytest.fixture(scope="module")
def tiny_target(tiny, tmp_path_factory):
    """A copy of the tiny target and its data: the methods write beside it, not into the shared fixture."""
    out = tmp_path_factory.mktemp("unlearn")
    shutil.copy(tiny.out_dir / "target.pt", out)
    shutil.copytree(tiny.out_dir / "data", out / "data")
    return out


@pytest.mark.parametrize("method", U.METHODS)
def test_every_method_lowers_forget_ma_on_the_tiny_setup(tiny, tiny_target, method):
    module, *flags = U.METHODS[method].split()
    metrics = importlib.import_module(module).main(["--out_dir", str(tiny_target), "--steps", "5", "--lr", "3e-4",
                                                    *flags, *FLAGS.get(method, [])])
    saved = json.loads((tiny_target / f"{method}.json").read_text())
    assert saved["method"] == method and saved["forget_ma"] == metrics["forget_ma"]
    assert saved["forget_ma"] < tiny.summary["target"]["forget_ma"]
    _, ckpt = load_checkpoint(tiny_target / f"{method}.pt")
    max_steps = 10 if method == "tau" else 5  # TAU's two phases each run up to --steps
    assert ckpt["config"]["lr"] == 3e-4 and ckpt["steps"] <= max_steps and ckpt["metrics"] == metrics


def test_pure_bf16_run_keeps_bf16_weights(tiny, tiny_target):
    ga.main(["--out_dir", str(tiny_target), "--steps", "5", "--lr", "3e-3", "--dtype", "bfloat16"])
    model, ckpt = load_checkpoint(tiny_target / "ga.pt")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert ckpt["metrics"]["forget_ma"] < tiny.summary["target"]["forget_ma"]


def test_pure_bf16_where_bf16_is_slow_runs_its_matmuls_in_float32(tiny, tiny_target, monkeypatch, mode_ops):
    """Where bf16 matmuls are slow, a pure-bf16 run keeps bf16 weights and runs every matmul, forward and backward,
    through train.Bf16Matmuls; it unlearns as the hardware's bf16 arithmetic does, up to float order."""
    argv = ["--out_dir", str(tiny_target), "--steps", "5", "--lr", "3e-3", "--dtype", "bfloat16"]
    native = ga.main(argv)
    mode_ops.clear()  # what the native run routed (none where bf16 is native)
    monkeypatch.setattr(T, "bf16_native", lambda device: False)
    emulated = ga.main(argv)
    model, _ = load_checkpoint(tiny_target / "ga.pt")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    mm = [f for f in mode_ops if f in T.MATMULS]
    assert len(mm) > 5 * 2 * len(block_linears(model))  # forward and backward, every step
    assert emulated["forget_ma"] == pytest.approx(native["forget_ma"], abs=0.02)
    assert emulated["retain_ma"] == pytest.approx(native["retain_ma"], abs=0.02)


@pytest.mark.parametrize("argv, message", [(["--retain", "l2"], "use none, gdr or klr"),
                                           (["--sure"], "add --retain gdr"),
                                           (["--selective", "--retain", "gdr"], "plain SGA"),
                                           (["--dtype", "float16"], "use float32 or bfloat16")])
def test_bad_settings_are_refused(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        ga.main(["--out_dir", str(tmp_path)] + argv)
