import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model as M
import quantize as Q
from data.prepare import load_data

ROOT = Path(__file__).resolve().parent.parent
os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = "1"  # read when transformers is imported, below


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group_size", [0, 32])
def test_rtn_error_within_half_a_step_and_requantizing_is_the_identity(sym, group_size):
    W = torch.randn(16, 64, generator=gen())
    for bits in range(2, 9):
        q, scale, zero = Q.rtn(W, bits, group_size, sym)
        assert q.min() >= 0 and q.max() <= 2 ** bits - 1 and torch.equal(q, q.round())
        Wq = Q.dequantize(q, scale, zero)
        step = Q.dequantize(torch.ones_like(q), scale, torch.zeros_like(zero))  # Δ of each entry's group
        err = (W - Wq).abs() / step
        if sym:  # the signed grid stops at (2^(N-1) - 1)·Δ: only entries above it may be off by more than Δ/2
            top = W / step > 2 ** (bits - 1) - 1
            assert (err[~top] <= 0.5 + 1e-5).all() and (err[top] <= 1 + 1e-5).all()
        else:
            assert (err <= 0.5 + 1e-5).all()
        q2 = Q.quantize(Wq.unflatten(1, (scale.shape[1], -1)), scale[..., None], zero[..., None], bits).flatten(1)
        assert torch.equal(q2, q)  # Q(Q(w)) = Q(w) on the same grid


def test_symmetric_grid_by_hand():
    # N = 2: Δ = max|w| / 2 = 0.5, w/Δ = [-2, -1, 0.52, 2] -> round [-2, -1, 1, 2] -> clamp to [-2, 1]
    w = torch.tensor([[-1.0, -0.5, 0.26, 1.0]])
    q, scale, zero = Q.rtn(w, 2)
    assert scale.item() == 0.5 and zero.item() == 2
    assert Q.dequantize(q, scale, zero).tolist() == [[-1.0, -0.5, 0.5, 0.5]]
    for bits in (3, 4, 8):  # every value is an integer multiple of Δ in -2^(N-1)..2^(N-1)-1
        W = torch.randn(8, 128, generator=gen(bits))
        q, scale, zero = Q.rtn(W, bits)
        k = Q.dequantize(q, scale, zero) / scale
        assert torch.allclose(k, k.round(), atol=1e-4)
        assert k.round().min() >= -2 ** (bits - 1) and k.round().max() <= 2 ** (bits - 1) - 1


def test_asymmetric_grid_by_hand():
    # N = 2, w in [-0.3, 0.6]: Δ = 0.9 / 3 = 0.3, z = round(0.3 / 0.3) = 1, levels -0.3, 0, 0.3, 0.6
    w = torch.tensor([[-0.3, 0.1, 0.2, 0.6]])
    q, scale, zero = Q.rtn(w, 2, sym=False)
    assert zero.item() == 1 and scale.item() == pytest.approx(0.3)
    assert Q.dequantize(q, scale, zero)[0].tolist() == pytest.approx([-0.3, 0.0, 0.3, 0.6])


def test_codebooks_hold_exactly_their_levels():
    assert len(Q.NF4.unique()) == 16 and Q.NF4.min() == -1 and Q.NF4.max() == 1 and 0 in Q.NF4
    assert torch.equal(Q.NF4, Q.NF4.sort().values)
    fp4 = {round(v * 192) for v in Q.FP4.abs().tolist()}  # E2M1 magnitudes over 12: 0, 1/192, 1/6 ... 1
    assert fp4 == {0, 1, 32, 48, 64, 96, 128, 192} and len(Q.FP4.unique()) == 15
    w = torch.randn(10, 100, generator=gen())
    for name, levels in Q.CODEBOOKS.items():
        q, absmax = Q.codebook_quantize(w, levels)
        assert q.shape == w.shape and len(absmax) == math.ceil(w.numel() / 64)
        blocks = torch.nn.functional.pad(w.flatten(), (0, -w.numel() % 64)).view(-1, 64)
        assert torch.equal(absmax, blocks.abs().amax(1))
        x = (blocks / absmax[:, None]).flatten()[:w.numel()]
        brute = (x[:, None] - levels[None]).abs().min(1).values  # distance to the nearest level
        assert torch.allclose((x - levels[q.flatten().long()]).abs(), brute)
        wq = Q.codebook_dequantize(q, absmax, levels)
        k = (torch.nn.functional.pad(wq.flatten(), (0, -w.numel() % 64)).view(-1, 64) / absmax[:, None])
        assert (k.flatten()[:, None] - levels[None]).abs().min(1).values.max() < 1e-6  # a level times absmax
        q2, _ = Q.codebook_quantize(wq, levels)
        assert torch.equal(Q.codebook_dequantize(q2, absmax, levels), wq)  # on-grid values are kept


@pytest.mark.parametrize("bits", range(1, 9))
def test_pack_unpack_round_trip(bits):
    q = torch.randint(0, 2 ** bits, (1001,), generator=gen(bits))
    p = Q.pack(q, bits)
    assert p.dtype == torch.uint8 and p.numel() == math.ceil(1001 * bits / 8)
    assert torch.equal(Q.unpack(p, bits, 1001).long(), q)


def test_two_4bit_codes_per_byte():
    assert Q.pack(torch.tensor([1, 2, 15]), 4).tolist() == [0x21, 0x0F]


def correlated_inputs(k, n, seed):
    """(k, n) inputs whose features are strongly correlated: a few latent factors plus a little noise."""
    g = gen(seed)
    return torch.randn(k, 4, generator=g) @ torch.randn(4, n, generator=g) + 0.05 * torch.randn(k, n, generator=g)


@pytest.mark.parametrize("sym,group_size,actorder", [(True, 0, False), (False, 32, False), (False, 32, True)])
def test_gptq_output_error_below_rtn_on_every_layer_of_a_gpt(sym, group_size, actorder):
    torch.manual_seed(0)
    gpt = M.GPT(M.GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=64))
    for i, (name, layer) in enumerate(M.block_linears(gpt).items()):
        W = layer.weight.data
        X = correlated_inputs(W.shape[1], 512, i)
        H = 2 * X @ X.T / X.shape[1]
        Wg, codes, scale, zero = Q.gptq(W, H, 4, group_size, sym, actorder=actorder)
        assert torch.equal(Q.dequantize(codes, scale, zero), Wg)  # what is stored is what was evaluated
        q, s, z = Q.rtn(W, 4, group_size, sym)
        e_gptq, e_rtn = ((W - Wg) @ X).square().sum(), ((W - Q.dequantize(q, s, z)) @ X).square().sum()
        assert e_gptq < 0.7 * e_rtn, name


def test_gptq_equals_the_column_by_column_obs_update():
    """Lazy blocks + the Cholesky rows of H⁻¹ give the same result as the plain OBS loop of GPTQ Eq. 3-4: quantize
    column i, W_F -= (w_i - q_i) / [H_F⁻¹]_ii · [H_F⁻¹]_{i,F}, then remove i from the inverse by Gaussian elimination."""
    X = correlated_inputs(40, 300, 0).double()
    W, H = torch.randn(6, 40, generator=gen(), dtype=torch.float64), 2 * X @ X.T / 300
    Hinv = torch.linalg.inv(H + 0.01 * H.diagonal().mean() * torch.eye(40, dtype=torch.float64))
    scale, zero = Q.quant_params(W, 4)
    Wr, Qr = W.clone(), torch.zeros_like(W)
    for i in range(40):
        Qr[:, i] = (Q.quantize(Wr[:, i:i + 1], scale, zero, 4) - zero)[:, 0] * scale[:, 0]
        Wr[:, i:] -= ((Wr[:, i] - Qr[:, i]) / Hinv[i, i])[:, None] * Hinv[i, i:][None]
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]  # Eq. 4
    Wg, *_ = Q.gptq(W.float(), H.float(), 4, blocksize=16)
    assert torch.allclose(Wg.double(), Qr, atol=1e-5)


@pytest.mark.parametrize("sym,group_size", [(True, 0), (False, 0), (True, 16), (False, 32)])
def test_gptq_with_identity_hessian_is_rtn(sym, group_size):
    W = torch.randn(24, 64, generator=gen())
    Wg, codes, scale, zero = Q.gptq(W, torch.eye(64), 3, group_size, sym, blocksize=16)
    q, s, z = Q.rtn(W, 3, group_size, sym)
    assert torch.equal(codes, q) and torch.equal(scale, s) and torch.equal(Wg, Q.dequantize(q, s, z))


def test_gptq_dead_columns_and_redamping(capsys):
    W = torch.randn(4, 8, generator=gen())
    X = torch.randn(8, 100, generator=gen(1))
    X[3] = 0  # an input that is always 0: its column is dropped
    Wg, *_ = Q.gptq(W, 2 * X @ X.T, 4)
    assert (Wg[:, 3] == 0).all() and (Wg[:, 2] != 0).any()
    Q.gptq(W[:, :2], torch.tensor([[1.0, 2.0], [2.0, 1.0]]), 4)  # eigenvalues 3 and -1: damping must reach > 1
    assert "re-damping" in capsys.readouterr().out
    with pytest.raises(ValueError, match="not positive-definite"):
        Q.gptq(W[:, :2], -torch.eye(2), 4)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="rtn, gptq, nf4, fp4"):
        Q.check("awq", 4)
    for bits in (1, 9):
        with pytest.raises(ValueError, match="2, 3, 4, 5, 6, 7, 8"):
            Q.check("rtn", bits)
    with pytest.raises(ValueError, match="4-bit"):
        Q.check("nf4", 8)
    with pytest.raises(ValueError, match="does not divide"):
        Q.quantize_weight(torch.randn(4, 48), "rtn", 4, group_size=32)
    r = subprocess.run([sys.executable, "quantize.py", "--bits", "9"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode != 0 and "2, 3, 4, 5, 6, 7, 8" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("method,bits,lm_head", [("rtn", 4, False), ("gptq", 4, True), ("nf4", 4, False),
                                                 ("rtn", 3, False)])
def test_quantized_checkpoint_is_small_and_loads_back(tmp_path, method, bits, lm_head):
    torch.manual_seed(0)
    gpt = M.GPT(M.GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=64)).eval()
    M.save_checkpoint(tmp_path / "fp.pt", gpt, kind="target")
    layers = Q.quantized_layers(gpt, lm_head)
    windows = torch.randint(0, 256, (8, 64), generator=gen())
    records = Q.quantize_model(gpt, method, bits, 0, True, windows, lm_head=lm_head)
    quant = dict(method=method, bits=bits, group_size=0, sym=True)
    Q.save_quantized(tmp_path / "q.pt", gpt, records, {"kind": "target", "model_args": vars(gpt.config)}, quant)
    fbytes = sum(4 * layer.weight.numel() for layer in layers.values())
    saved = (tmp_path / "fp.pt").stat().st_size - (tmp_path / "q.pt").stat().st_size
    assert fbytes - saved <= 0.35 * fbytes  # the quantized tensors on disk vs in float32
    loaded, ckpt = Q.load_quantized(tmp_path / "q.pt")
    assert ckpt["kind"] == "target" and ckpt["quant"]["method"] == method
    for k, v in gpt.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    x = torch.randint(0, 256, (2, 64), generator=gen(1))
    assert torch.equal(loaded(x)[0], gpt(x)[0])
    with pytest.raises(SystemExit, match="quantize.load_quantized"):
        M.load_checkpoint(tmp_path / "q.pt")


def test_relative_output_error_by_hand():
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 5, 8, generator=gen())

    def shrink():  # Q = 0.9·W, so ‖(W - Q)X‖² / ‖WX‖² = 0.01 whatever X is
        layer.weight.data *= 0.9
        return "records"
    assert Q.output_error(layer, {"layer": layer}, x, shrink) == ("records", pytest.approx(0.01))


def tiny_hf(tmp_path, arch, with_tokenizer=True):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              PreTrainedTokenizerFast)
    text = (ROOT.parent / "shared" / "data" / "alice_in_wonderland.txt").read_text()[:6000]
    (tmp_path / "text.txt").write_text(text)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    V = tok.get_vocab_size()
    torch.manual_seed(0)
    if arch == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    else:
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    hf.save_pretrained(tmp_path / arch)
    if with_tokenizer:
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / arch)
    return tmp_path / arch, tmp_path / "text.txt"


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_models_quantize_and_report_perplexity(tmp_path, capsys, arch):
    path, text = tiny_hf(tmp_path, arch)
    Q.main_hf(Q.QuantConfig(hf=str(path), text=str(text), method="gptq", bits=4, nsamples=8, group_size=32))
    line = capsys.readouterr().out.strip().splitlines()[-1]
    before, after = map(float, re.search(r"([\d.]+) before, ([\d.]+) after", line).groups())
    assert f"{14 if arch == 'llama' else 8} layers" in line and math.isfinite(after) and before != after


def test_hf_without_tokenizer_is_refused(tmp_path):
    path, text = tiny_hf(tmp_path, "gpt2", with_tokenizer=False)
    with pytest.raises(SystemExit, match="tokenizer"):
        Q.main_hf(Q.QuantConfig(hf=str(path), text=str(text), method="rtn"))


def test_blockwise_gptq_equals_running_the_whole_model_per_layer():
    """quantize_model's cached block inputs give each layer the inputs it gets in the full model with every
    earlier layer already quantized (what quantize_layers does by re-running the model for each layer)."""
    torch.manual_seed(0)
    a = M.GPT(M.GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    b = M.GPT(M.GPTConfig(block_size=64, vocab_size=64, n_layer=2, n_head=2, n_embd=32)).eval()
    b.load_state_dict(a.state_dict())
    windows = torch.randint(0, 64, (16, 64), generator=gen())
    ra = Q.quantize_model(a, "gptq", 4, 16, False, windows, lm_head=True)
    rb = Q.quantize_layers(b, Q.quantized_layers(b, lm_head=True), "gptq", 4, 16, False, windows)
    assert list(ra) == list(rb) == list(M.block_linears(a)) + ["lm_head"]
    for k, v in a.state_dict().items():
        assert torch.allclose(v, b.state_dict()[k], atol=1e-6), k


def test_gptq_beats_rtn_on_every_layer_of_the_tiny_target_on_real_text(tiny):
    gpt, ckpt = M.load_checkpoint(tiny.out_dir / "target.pt")
    data = load_data(ckpt["data"], tiny.out_dir)
    windows = Q.calibration_windows(data.general_train, 32, gpt.config.block_size, 0)
    for name, layer in Q.quantized_layers(gpt).items():
        H = Q.hessian(gpt, name, layer, windows)  # inputs of the full-precision model
        W = layer.weight.data
        err = lambda Wq: torch.trace((W - Wq) @ H @ (W - Wq).T)  # = 2‖(W - Q)X‖²/n
        assert err(Q.quantize_weight(W, "gptq", 4, H=H)[0]) < err(Q.quantize_weight(W, "rtn", 4)[0]), name
    _, quant = Q.quantize_with(gpt, Q.QuantConfig(method="gptq", nsamples=8, seed=3), data)
    assert quant["calibration"] == dict(source="general_train", nsamples=8, tokens=gpt.config.block_size, seed=3)
    assert 0 < quant["rel_output_error"] < 0.05


def test_cli_quantizes_the_newest_unlearned_model_and_compares_with_the_target(tiny, tmp_path, capsys):
    shutil.copytree(tiny.out_dir / "data", tmp_path / "data")
    shutil.copy(tiny.out_dir / "target.pt", tmp_path / "target.pt")
    import unlearn_ga  # a real unlearned checkpoint: it must carry the (non-default) data settings of its target
    unlearn_ga.main(["--out_dir", str(tmp_path), "--steps", "2"])
    Q.main(Q.QuantConfig(out_dir=str(tmp_path), bits=3, group_size=32, sym=False))
    out = capsys.readouterr().out
    for row in ("ga          float32", "ga          rtn3_g32_asym", "target      float32", "target      rtn3_g32_asym"):
        assert row in out
    assert "forget exact-match of ga as a share of target's" in out
    model, ckpt = Q.load_quantized(tmp_path / "ga_rtn3_g32_asym.pt")
    assert ckpt["quant"]["bits"] == 3 and ckpt["quant"]["source"].endswith("ga.pt")
    assert ckpt["kind"] == "ga" and M.perplexity(model, load_data(ckpt["data"], tmp_path).general_val) > 1
