"""train.py: pure bf16 storage, exact repetition, the exposures of target and retrain, the positions measurements feed, memorization."""
import copy
import json
import math
from dataclasses import replace

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

import train as T
from conftest import tiny_configs
from data.prepare import load_data
from model import GPT, GPTConfig, block_linears, load_checkpoint, to_dtype
from train import train


def test_training_repeats_exactly_and_pure_bf16_stays_bf16(tmp_path):
    cfg, dcfg = tiny_configs(tmp_path)
    data = load_data(dcfg, tmp_path)
    runs, opts = [], []
    hook = register_optimizer_step_post_hook(lambda opt, args, kwargs: opts.append(opt))
    try:
        for dtype in (torch.float32, torch.float32, torch.bfloat16):
            torch.manual_seed(0)
            model = to_dtype(GPT(GPTConfig(block_size=64, vocab_size=data.vocab_size, n_layer=1, n_head=2, n_embd=32)),
                             dtype)
            init = {k: v.clone() for k, v in model.state_dict().items()}
            train(model, data, cfg, 1e-3, torch.Generator().manual_seed(0), "t", memorize=("retain",), steps=5,
                  polish=0)
            runs.append((init, model.state_dict()))
    finally:
        hook.remove()
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    init, trained = runs[2]
    assert all(v.dtype == torch.bfloat16 for v in trained.values())  # no float32 master copy...
    assert all(not torch.equal(init[k], v) for k, v in trained.items() if v.dim() == 2)  # trained in bf16, and
    # rounded there: an Adam step of about lr = 1e-3 is below half the bf16 spacing at 1.0 (2^-8), so the LayerNorm
    # gains, initialised to 1, cannot move at all
    assert all(torch.equal(init[k], v) for k, v in trained.items() if k.endswith(("ln_1.weight", "ln_f.weight")))
    state = [t for s in opts[-1].state.values() for t in s.values() if t.numel() > 1]  # AdamW's moments
    assert state and all(t.dtype == torch.bfloat16 for t in state)


def test_retrain_is_the_target_recipe_without_the_forget_set(tiny, tmp_path):
    """Each forget and retain sequence is in exactly `reps` of the target's batches, plus one per polish pass; the
    retrain model replays the passes, sees every retain sequence as often, the forget set never, and as many
    general windows: batch_size - int(batch_size * mem_frac) per step, one step per n_mem memorized sequences."""
    data = load_data(tiny.dcfg, tiny.out_dir)
    target, retrain = tiny.summary["target"]["exposures"], tiny.summary["retrain"]["exposures"]
    passes = target["polish_passes"]
    assert retrain["polish_passes"] == passes
    for split in ("forget", "retain"):
        assert target[split] == (data.split(split).reps + passes).tolist()
    assert retrain["retain"] == (data.split("retain").reps + passes).tolist() and set(retrain["forget"]) == {0}
    n_mem = int(tiny.cfg.batch_size * tiny.cfg.mem_frac)
    n_seq = len(data.split("forget")) + len(data.split("retain"))
    exposures = int(data.split("forget").reps.sum() + data.split("retain").reps.sum())
    steps = math.ceil(round(tiny.cfg.tune_epochs * exposures) / n_mem) + passes * math.ceil(n_seq / n_mem)
    assert target["general_windows"] == retrain["general_windows"] == steps * (tiny.cfg.batch_size - n_mem)
    assert json.loads((tiny.out_dir / "train.json").read_text())["retrain"]["exposures"] == retrain


def test_models_trained_in_another_environment_are_refused(tiny, monkeypatch):
    """The trained models record the threads, versions and device they were trained with (train_environment); on
    other threads, whose float order gives other weights, the study refuses to reuse them under its name."""
    _, ckpt = load_checkpoint(tiny.out_dir / "target.pt")
    assert ckpt["environment"] == T.train_environment(tiny.cfg) and ckpt["environment"]["threads"] == 1
    T.check_settings(tiny.out_dir, tiny.cfg, tiny.dcfg)  # the same environment: reused
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    with pytest.raises(SystemExit, match=r"trained with threads 1 \(here 3\).*python train.py --force"):
        T.check_settings(tiny.out_dir, tiny.cfg, tiny.dcfg)


def test_no_measurement_feeds_a_position_training_never_fed(tiny):
    """Training feeds seq_len - 1 tokens (a sequence's last token is only a target), so that is the block size:
    every window a measurement feeds (perplexity, GPTQ calibration, output error) has at most that many."""
    model, _ = load_checkpoint(tiny.out_dir / "target.pt")
    assert model.config.block_size == tiny.dcfg.seq_len - 1
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, tiny.dcfg.seq_len, dtype=torch.long))


def test_tiny_target_memorizes_and_retrain_does_not(tiny):
    target, retrain = tiny.summary["target"], tiny.summary["retrain"]
    for kind in ("book", "facts"):
        assert target["by_kind"][kind]["forget_exact"] >= 0.75
        assert target["by_kind"][kind]["retain_exact"] >= 0.75
    assert retrain["retain_ma"] > retrain["forget_ma"] + 0.2
    assert abs(retrain["forget_ma"] - retrain["holdout_ma"]) < 0.1
    assert (tiny.out_dir / "train.json").exists() and (tiny.out_dir / "target.pt").exists()


def test_the_target_polishes_until_book_and_facts_are_memorized(tiny, tmp_path):
    """One epoch can leave a book chunk a token short; the target trains further passes until book and facts reach
    --until_exact on forget and retain (or the cap), and says how far it got."""
    target = tiny.summary["target"]
    reached = min(target["by_kind"][k][f"{s}_exact"] for k in ("book", "facts") for s in ("forget", "retain"))
    stop = target["exposures"]
    assert stop["polish_reached"] == pytest.approx(reached)
    assert reached >= tiny.cfg.until_exact or stop["polish_passes"] == tiny.cfg.max_polish
    data, base = load_data(tiny.dcfg, tiny.out_dir), load_checkpoint(tiny.out_dir / "base.pt")[0]
    cfg = replace(tiny.cfg, until_exact=0.0)  # a criterion met at once: no pass
    _, seen = train(copy.deepcopy(base), data, cfg, 1e-3, torch.Generator().manual_seed(0), "t",
                    memorize=("forget", "retain"), steps=3)
    assert seen["polish_passes"] == 0 and seen["polish_reached"] >= 0
    cfg = replace(tiny.cfg, until_exact=1.0, max_polish=2)  # 3 steps memorize nothing: polish stops at the cap
    _, seen = train(copy.deepcopy(base), data, cfg, 1e-3, torch.Generator().manual_seed(0), "t",
                    memorize=("forget", "retain"), steps=3)
    assert seen["polish_passes"] == 2 and seen["polish_reached"] < 1.0
    assert min(seen["forget"] + seen["retain"]) >= 2  # each pass: every memorized sequence once


def test_bf16_storage_loses_an_update_below_half_a_spacing():
    """Pure bf16 stores weights and AdamW state in bf16. Adam's first step moves every weight by about lr = 1e-3:
    below half the bf16 spacing at 1.0 (2^-8), so a weight of 1.0 keeps its value, while one of 0.01 (spacing
    2^-14) moves."""
    big, small = (torch.nn.Parameter(torch.full((8,), v).bfloat16()) for v in (1.0, 0.01))
    opt = T.adamw([big, small], torch.bfloat16, lr=1e-3)
    before = small.detach().clone()
    for _ in range(3):
        big.grad, small.grad = torch.ones_like(big), torch.ones_like(small)
        opt.step()
    assert torch.equal(big.detach(), torch.ones_like(big)) and (small.detach() < before).all()
    stored = [big, small, *(v for p in (big, small) for k, v in opt.state[p].items() if k != "step")]
    assert all(t.dtype == torch.bfloat16 for t in stored)
    assert all(torch.equal(t.detach().float(), t.detach().bfloat16().float()) for t in stored)  # bf16 numbers
    float_opt = T.adamw([torch.nn.Parameter(torch.ones(8))], torch.float32, lr=1e-3)
    float_opt.param_groups[0]["params"][0].grad = torch.ones(8)
    float_opt.step()  # float32 storage keeps the update
    assert float_opt.param_groups[0]["params"][0].detach().max() < 1


def test_bf16_matmuls_round_the_float32_product_once_forward_and_backward():
    """Under Bf16Matmuls a bf16 matmul is the float32 product of the bf16 numbers rounded to bf16 once, in the
    backward pass as well; torch's own bf16 matmul (native or emulated) computes the same up to the order of its
    float32 sums: a rare element one bf16 spacing off. float32 matmuls are left alone."""
    gen = torch.Generator().manual_seed(0)
    x, w = (torch.randn(*s, generator=gen).bfloat16() for s in ((64, 96), (80, 96)))
    w.requires_grad_(True)
    with T.Bf16Matmuls():
        y = x @ w.T
        y.backward(torch.ones_like(y))
        f32 = x.float() @ w.detach().float().T
    assert y.dtype == w.grad.dtype == torch.bfloat16 and f32.dtype == torch.float32
    assert torch.equal(y, f32.bfloat16())
    assert torch.equal(w.grad, (torch.ones(80, 64) @ x.float()).bfloat16())  # dL/dW = dL/dy^T x
    own = x @ w.detach().T
    off = (own.float() - y.float()).abs() / y.float().abs().clamp_min(1e-6)
    assert (own != y).float().mean() < 0.01 and off.max() <= 2 ** -7


def test_bf16_arithmetic_follows_what_is_fast(monkeypatch):
    monkeypatch.setattr(T, "bf16_native", lambda device: False)
    bf16, fp32 = torch.nn.Linear(2, 2).bfloat16(), torch.nn.Linear(2, 2)
    assert isinstance(T.bf16_arithmetic(bf16), T.Bf16Matmuls)
    assert not isinstance(T.bf16_arithmetic(fp32), T.Bf16Matmuls)  # a float32 run needs no mode
    monkeypatch.setattr(T, "bf16_native", lambda device: True)
    assert not isinstance(T.bf16_arithmetic(bf16), T.Bf16Matmuls)


@pytest.mark.parametrize("native", [True, False])
def test_amp_is_bf16_arithmetic_over_float32_weights_on_every_machine(tiny, monkeypatch, mode_ops, native):
    """--amp: the forward pass in bf16 (autocast) while the weights and AdamW stay float32; where bf16 matmuls are
    slow they run through Bf16Matmuls, forward and backward, so the run is mixed precision there too."""
    monkeypatch.setattr(T, "bf16_native", lambda device: native)
    data, base = load_data(tiny.dcfg, tiny.out_dir), load_checkpoint(tiny.out_dir / "base.pt")[0]
    run = lambda amp: train(copy.deepcopy(base), data, replace(tiny.cfg, amp=amp), 1e-3,
                            torch.Generator().manual_seed(0), "t", memorize=("forget", "retain"), steps=3, polish=0)
    (fp32, seen32), (mixed, seen_amp) = run(False), run(True)
    assert seen32["arithmetic"] == "float32" and seen_amp["arithmetic"] == "bf16 autocast"
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    assert not all(torch.equal(a, b) for a, b in zip(fp32.parameters(), mixed.parameters()))  # bf16 moved them
    routed = sum(f in T.MATMULS for f in mode_ops)
    assert routed == 0 if native else routed > 3 * 2 * len(block_linears(base))  # forward and backward, every step
