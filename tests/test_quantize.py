"""quantize.py: each quantizer against its definition and a hand computation, GPTQ against the OBS loop and RTN,
the packed checkpoint format, the command line."""
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import model as M
import quantizers as Q
import quantize as QC
from settings import save_checkpoint
from data.prepare import load_data

ROOT = Path(__file__).resolve().parent.parent


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


def test_llm_int8_absmax_grid_by_hand():
    # LLM.int8: Δ = max|w| / 127, codes ±127, so +max|w| is on the grid (Eq. 2's Δ = max|w|/128 clamps it)
    w = torch.tensor([[-0.5, 0.004, 1.27]])
    q, scale, zero = Q.rtn(w, 8, absmax=True)
    assert scale.item() == pytest.approx(0.01) and zero.item() == 128
    assert Q.dequantize(q, scale, zero)[0].tolist() == pytest.approx([-0.5, 0.0, 1.27])
    assert Q.dequantize(*Q.rtn(w, 8))[0, 2].item() == pytest.approx(1.27 * 127 / 128)
    W = torch.randn(8, 64, generator=gen())
    q, scale, zero = Q.rtn(W, 8, absmax=True)
    assert ((q - zero).abs() <= 127).all() and ((W - Q.dequantize(q, scale, zero)).abs() <= scale / 2 + 1e-7).all()
    assert QC.quant_name(QC.QuantConfig(bits=8, absmax=True)) == "int8"


def test_asymmetric_grid_by_hand():
    # N = 2, w in [-0.3, 0.6]: Δ = 0.9 / 3 = 0.3, z = round(0.3 / 0.3) = 1, levels -0.3, 0, 0.3, 0.6
    w = torch.tensor([[-0.3, 0.1, 0.2, 0.6]])
    q, scale, zero = Q.rtn(w, 2, sym=False)
    assert zero.item() == 1 and scale.item() == pytest.approx(0.3)
    assert Q.dequantize(q, scale, zero)[0].tolist() == pytest.approx([-0.3, 0.0, 0.3, 0.6])


def test_codebooks_are_bitsandbytes_levels_derived_from_their_definitions():
    """NF4 (QLoRA; bitsandbytes create_normal_map(offset=0.9677083, use_extra_value=True)): the normal quantiles
    Φ⁻¹ at 8 points from the offset to 1/2 on the positive side and 7 on the negative side, plus 0, divided by the
    largest. FP4 (bitsandbytes' E2M1, code order): bit 3 the sign, bits 2-1 the exponent e, bit 0 the mantissa m;
    e = 0 is 0 or 0.0625, else 2^(4-e)·(1 + m/2), all divided by 12."""
    offset = 0.9677083
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9)[:-1].double())
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8)[:-1].double())
    nf4 = torch.cat([pos, neg, torch.zeros(1, dtype=torch.float64)]).sort().values
    assert torch.allclose(Q.NF4.double(), nf4 / nf4.max(), atol=1e-6)
    fp4 = []
    for code in range(16):
        e, m = (code >> 1) & 3, code & 1
        fp4.append((-1) ** (code >> 3) * (0.0625 * m if e == 0 else 2 ** (4 - e) * (1 + m / 2)) / 12)
    assert Q.FP4.tolist() == pytest.approx(fp4) and len(Q.FP4.unique()) == 15  # +0 and -0 are one value


def test_codebook_quantization_picks_the_nearest_level_per_block():
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


@pytest.mark.parametrize("group_size,sym", [(0, True), (8, True), (8, False), (12, True)])
def test_gptq_equals_the_column_by_column_obs_update(group_size, sym):
    """Lazy blocks + the Cholesky rows of H⁻¹ give the same result as the plain OBS loop of GPTQ Eq. 3-4: quantize
    column i, W_F -= (w_i - q_i) / [H_F⁻¹]_ii · [H_F⁻¹]_{i,F}, then remove i from the inverse by Gaussian elimination.
    With groups smaller than the block (8 < 16), each group's grid comes from the error-updated weights at its first
    column, so the grids depend on the Hessian too. 12 does not divide the 40 columns: the last group has 4."""
    X = correlated_inputs(40, 300, 0).double()
    W, H = torch.randn(6, 40, generator=gen(), dtype=torch.float64), 2 * X @ X.T / 300
    Hinv = torch.linalg.inv(H + 0.01 * H.diagonal().mean() * torch.eye(40, dtype=torch.float64))
    scale, zero = Q.quant_params(W, 4, sym)
    Wr, Qr = W.clone(), torch.zeros_like(W)
    for i in range(40):
        if group_size and i % group_size == 0:
            scale, zero = Q.quant_params(Wr[:, i:i + group_size], 4, sym)
        Qr[:, i] = (Q.quantize(Wr[:, i:i + 1], scale, zero, 4) - zero)[:, 0] * scale[:, 0]
        Wr[:, i:] -= ((Wr[:, i] - Qr[:, i]) / Hinv[i, i])[:, None] * Hinv[i, i:][None]
        Hinv = Hinv - Hinv[:, i:i + 1] @ Hinv[i:i + 1, :] / Hinv[i, i]  # Eq. 4
    Wg, *_ = Q.gptq(W.float(), H.float(), 4, group_size, sym, blocksize=16)
    assert torch.allclose(Wg.double(), Qr, atol=1e-5)
    if group_size:  # the grids differ from RTN's on the original weights: the error feedback moved them
        assert not torch.allclose(Wg, Q.dequantize(*Q.rtn(W.float(), 4, group_size, sym), group_size))


@pytest.mark.parametrize("sym,group_size", [(True, 0), (False, 0), (True, 16), (False, 32), (False, 24)])
def test_gptq_with_identity_hessian_is_rtn(sym, group_size):
    W = torch.randn(24, 64, generator=gen())
    Wg, codes, scale, zero = Q.gptq(W, torch.eye(64), 3, group_size, sym, blocksize=16)
    q, s, z = Q.rtn(W, 3, group_size, sym)
    assert torch.equal(codes, q) and torch.equal(scale, s) and torch.equal(Wg, Q.dequantize(q, s, z, group_size))


@pytest.mark.parametrize("sym", [True, False])
def test_a_ragged_last_group_has_the_grid_of_its_own_columns(sym):
    """group_size 32 on 80 columns (SmolLM2's 576 with 128 is the same case): groups of 32, 32 and 16, each
    quantized as if it stood alone, as GPTQ implementations do; the stored record dequantizes back."""
    W = torch.randn(5, 80, generator=gen(4))
    q, scale, zero = Q.rtn(W, 4, 32, sym)
    assert q.shape == W.shape and scale.shape == (5, 3)
    for j, cols in enumerate((slice(0, 32), slice(32, 64), slice(64, 80))):
        qj, sj, zj = Q.rtn(W[:, cols], 4, 0, sym)
        assert torch.equal(q[:, cols], qj) and torch.equal(scale[:, j], sj[:, 0]) and torch.equal(zero[:, j], zj[:, 0])
    Wq, rec = Q.quantize_weight(W, "rtn", 4, group_size=32, sym=sym)
    assert torch.equal(Wq, Q.dequantize(q, scale, zero, 32))
    quant = dict(method="rtn", bits=4, group_size=32)
    assert torch.equal(Q.dequantize_record(rec, quant), Wq)


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
        Q.check("hqq", 4)
    for bits in (1, 9):
        with pytest.raises(ValueError, match="2, 3, 4, 5, 6, 7, 8"):
            Q.check("rtn", bits)
    with pytest.raises(ValueError, match="4-bit"):
        Q.check("nf4", 8)
    r = subprocess.run([sys.executable, "quantize.py", "--bits", "9"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "--bits 9: must be in [2, 8]" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("method,bits,lm_head", [("rtn", 4, False), ("gptq", 4, True), ("nf4", 4, False),
                                                 ("rtn", 3, False)])
def test_quantized_checkpoint_is_small_and_loads_back(tmp_path, method, bits, lm_head):
    torch.manual_seed(0)
    gpt = M.GPT(M.GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=64)).eval()
    save_checkpoint(tmp_path / "fp.pt", gpt, kind="target")
    layers = Q.quantized_layers(gpt, lm_head)
    windows = torch.randint(0, 256, (8, 64), generator=gen())
    records = QC.quantize_layers(gpt, layers, method, bits, 0, True, windows)
    quant = dict(method=method, bits=bits, group_size=0, sym=True)
    QC.save_quantized(tmp_path / "q.pt", gpt, records, {"kind": "target", "model_args": vars(gpt.config)}, quant)
    fbytes = sum(4 * layer.weight.numel() for layer in layers.values())
    saved = (tmp_path / "fp.pt").stat().st_size - (tmp_path / "q.pt").stat().st_size
    assert fbytes - saved <= 0.35 * fbytes  # the quantized tensors on disk vs in float32
    loaded, ckpt = QC.load_quantized(tmp_path / "q.pt")
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
    reference = QC.output_reference(layer, {"layer": layer}, x)
    assert QC.output_error({"layer": layer}, reference, shrink) == ("records", pytest.approx(0.01))


def test_gptq_beats_rtn_on_every_layer_of_the_tiny_target_on_real_text(tiny):
    gpt, ckpt = M.load_checkpoint(tiny.out_dir / "target.pt")
    data = load_data(ckpt["data"], tiny.out_dir)
    windows = QC.calibration_windows(data.general_train, 32, gpt.config.block_size, 0)
    layers, X = Q.quantized_layers(gpt), {}
    QC.layer_inputs(gpt, layers, windows, X.setdefault, batch_size=len(windows))  # the full-precision model's inputs
    for name, layer in layers.items():
        H = 2 * X[name].T @ X[name] / len(X[name])
        W = layer.weight.data
        err = lambda Wq: torch.trace((W - Wq) @ H @ (W - Wq).T)  # = 2‖(W - Q)X‖²/n
        assert err(Q.quantize_weight(W, "gptq", 4, H=H)[0]) < err(Q.quantize_weight(W, "rtn", 4)[0]), name
    _, quant = QC.quantize_with(gpt, QC.QuantConfig(method="gptq", nsamples=8, seed=3), data)
    assert quant["calibration"] == dict(source="general", nsamples=8, tokens=gpt.config.block_size, seed=3)
    assert 0 < quant["rel_output_error"] < 0.05


def test_calibration_on_the_retain_set_draws_its_windows_from_the_retain_sequences_only(tiny):
    model, ckpt = M.load_checkpoint(tiny.out_dir / "target.pt")
    data = load_data(ckpt["data"], tiny.out_dir)
    stream = QC.calibration_text(data, "retain")
    seqs = data.split("retain")
    n0 = int(seqs.length[0])
    assert len(stream) == int(seqs.length.sum()) and torch.equal(stream[:n0], seqs.x[0, :n0])
    assert QC.calibration_text(data, "general") is data.general_train
    cfg = QC.QuantConfig(method="gptq", nsamples=4, calib="retain", seed=3)
    assert QC.quant_name(cfg) == "gptq4_retain" and QC.quant_name(QC.QuantConfig(calib="retain")) == "rtn4"
    windows = QC.calibration_windows(stream, 4, model.config.block_size, 3)
    retain_ids = set(stream.tolist())
    assert all(set(w.tolist()) <= retain_ids for w in windows)
    _, quant = QC.quantize_with(model, cfg, data)
    assert quant["calibration"]["source"] == "retain" and 0 < quant["rel_output_error"] < 0.05
    with pytest.raises(ValueError, match="calib"):
        QC.QuantConfig(calib="forget")


def test_cli_quantizes_the_newest_unlearned_model_and_compares_with_the_target(tiny, tmp_path, capsys):
    shutil.copytree(tiny.out_dir / "data", tmp_path / "data")
    shutil.copy(tiny.out_dir / "target.pt", tmp_path / "target.pt")
    import unlearn_ga  # a real unlearned checkpoint: it must carry the (non-default) data settings of its target
    unlearn_ga.main(["--out_dir", str(tmp_path), "--steps", "2"])
    QC.quantize_checkpoint(QC.QuantConfig(out_dir=str(tmp_path), bits=3, group_size=32, sym=False))
    out = capsys.readouterr().out
    for row in ("ga          float32", "ga          rtn3_g32_asym", "target      float32", "target      rtn3_g32_asym"):
        assert row in out
    assert "forget exact-match of ga as a share of target's" in out and "the rounded update keeps" in out
    model, ckpt = QC.load_quantized(tmp_path / "ga_rtn3_g32_asym.pt")
    assert ckpt["quant"]["bits"] == 3 and ckpt["quant"]["source"].endswith("ga.pt")
    data = load_data(ckpt["data"], tmp_path)
    assert ckpt["kind"] == "ga" and M.perplexity(model, data.general_val) > 1
    # its metrics are the quantized model's own, not the full-precision ones of ga.pt
    _, fp = M.load_checkpoint(tmp_path / "ga.pt")
    assert ckpt["metrics"]["forget_ma"] == pytest.approx(M.memorization(model, data)["forget_ma"])
    assert ckpt["metrics"]["ppl"] == pytest.approx(M.perplexity(model, data.general_val))
    assert ckpt["metrics"]["ppl"] != pytest.approx(fp["metrics"]["holdout_ppl"]) and ckpt["metrics"]["seconds"] >= 0


def test_a_bf16_model_is_quantized_onto_its_grid_exactly():
    """A pure-bf16 model's quantized copy must hold the quantizer's levels: int8 levels written back into bf16 are
    rounded again (8 bits of mantissa against 8-bit codes times a float scale), most of them off the grid."""
    torch.manual_seed(0)
    gpt = M.to_dtype(M.GPT(M.GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=64)), torch.bfloat16)
    with pytest.raises(ValueError, match="float32 copy"):
        QC.quantize_layers(gpt, Q.quantized_layers(gpt), "rtn", 8, absmax=True)
    copy32 = M.to_dtype(M.GPT(gpt.config), torch.float32)
    copy32.load_state_dict(gpt.state_dict())  # bf16 -> float32 is exact
    quant = dict(method="rtn", bits=8, group_size=0)
    records = QC.quantize_layers(copy32, Q.quantized_layers(copy32), "rtn", 8, absmax=True)
    for name, layer in Q.quantized_layers(copy32).items():
        W, scale = layer.weight.detach(), records[name]["scale"]
        assert torch.equal(W, Q.dequantize_record(records[name], quant)), name  # exactly the quantizer's values
        assert (W / scale - (W / scale).round()).abs().max() < 1e-4, name  # on the grid
        off = W.bfloat16().float() / scale
        assert (off - off.round()).abs().max() > 0.1  # what bf16 storage would have done to them


def test_a_file_that_is_not_a_checkpoint_is_named_not_deleted(tmp_path):
    notes = tmp_path / "notes.pt"
    notes.write_text("my notes, not a model")
    r = subprocess.run([sys.executable, "quantize.py", "--ckpt", str(notes), "--out_dir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "not a nanoUnlearn checkpoint" in r.stderr
    assert "Traceback" not in r.stderr and "elete" not in r.stderr and notes.exists()
    with pytest.raises(SystemExit, match="not a nanoUnlearn quantized checkpoint") as e:
        QC.load_quantized(notes)
    assert "elete" not in str(e.value)


def salient_inputs(n, k, channel, gain, seed):
    """(n, k) Gaussian inputs whose one channel has `gain` times the magnitude of the others (AWQ's salient channel)."""
    X = torch.randn(n, k, generator=gen(seed))
    X[:, channel] *= gain
    return X


def out_err(W, Wq, X):
    return ((W - Wq) @ X.T).square().sum()


@pytest.mark.parametrize("sym,group_size", [(True, 0), (False, 0), (True, 16), (False, 24)])
def test_awq_with_alpha_0_and_no_clipping_is_rtn(sym, group_size):
    """n_grid = 1 leaves α = 0 alone on the grid: s = s_X^0 = 1 (normalised: 1 / sqrt(1·1) = 1), Q(W·1)·1⁻¹ = RTN."""
    W, X = torch.randn(8, 48, generator=gen()), salient_inputs(100, 48, 3, 20, 1)
    Wq, codes, scale, zero, s, alpha = Q.awq(W, X, 3, group_size, sym, clip=False, n_grid=1)
    q, sr, zr = Q.rtn(W, 3, group_size, sym)
    assert alpha == 0 and torch.equal(s, torch.ones(48))
    assert torch.equal(codes, q) and torch.equal(scale, sr) and torch.equal(zero, zr)
    assert torch.equal(Wq, Q.dequantize(q, sr, zr, group_size))


@pytest.mark.parametrize("bits,sym,group_size", [(3, True, 0), (4, False, 0), (4, False, 16)])
def test_awq_beats_rtn_when_one_input_channel_has_large_activations(bits, sym, group_size):
    """A channel with 30x the activations of the others dominates WX: AWQ scales its weights up by the largest s, so
    they lose less to rounding, and the output error on those inputs drops well below RTN's."""
    W, X = torch.randn(16, 64, generator=gen()), salient_inputs(256, 64, 5, 30, 1)
    Wq, *_, s, alpha = Q.awq(W, X, bits, group_size, sym)
    e_rtn = out_err(W, Q.dequantize(*Q.rtn(W, bits, group_size, sym), group_size), X)
    assert alpha > 0 and s.argmax() == 5
    assert out_err(W, Wq, X) < 0.7 * e_rtn


def test_awq_scales_are_the_normalised_activation_power_and_the_search_only_helps(tiny):
    """On every block Linear of the tiny target, with its inputs from general text: α is on the grid i/20 in [0, 1),
    s = s_X^α / sqrt(max·min) (so max(s)·min(s) = 1), and the error of the chosen α is at most that of α = 0, which
    is RTN's. Clipping (per output channel here, where the rows' errors add up exactly) can only lower it further."""
    gpt, ckpt = M.load_checkpoint(tiny.out_dir / "target.pt")
    data = load_data(ckpt["data"], tiny.out_dir)
    windows = QC.calibration_windows(data.general_train, 16, gpt.config.block_size, 0)
    layers, X = Q.quantized_layers(gpt), {}
    QC.layer_inputs(gpt, layers, windows, X.setdefault, batch_size=len(windows))
    for name, layer in layers.items():
        W, x = layer.weight.data, X[name]
        Wn, *_, s, alpha = Q.awq(W, x, 4, 0, True, clip=False)
        assert 0 <= alpha < 1 and alpha * 20 == round(alpha * 20), name
        s_alpha = x.abs().mean(0).pow(alpha).clamp(min=1e-4)
        assert torch.allclose(s, s_alpha / (s_alpha.max() * s_alpha.min()).sqrt()), name
        assert (s.max() * s.min()).item() == pytest.approx(1)
        e_rtn = out_err(W, Q.dequantize(*Q.rtn(W, 4)), x)
        assert out_err(W, Wn, x) <= e_rtn * (1 + 1e-6), name
        Wc, *_, sc, alpha_c = Q.awq(W, x, 4, 0, True)
        assert alpha_c == alpha and torch.equal(sc, s)  # the clip search comes after the scale search
        assert out_err(W, Wc, x) <= out_err(W, Wn, x) * (1 + 1e-6), name


def test_awq_checkpoint_loads_back_the_weights_it_wrote(tmp_path):
    torch.manual_seed(0)
    gpt = M.GPT(M.GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=2, n_embd=64)).eval()
    layers = Q.quantized_layers(gpt)
    windows = torch.randint(0, 256, (8, 64), generator=gen())
    records = QC.quantize_layers(gpt, layers, "awq", 4, 32, False, windows)
    quant = dict(method="awq", bits=4, group_size=32, sym=False)
    for name, layer in layers.items():
        assert records[name]["awq_scale"].shape == (layer.weight.shape[1],) and 0 <= records[name]["alpha"] < 1
        assert torch.equal(Q.dequantize_record(records[name], quant), layer.weight), name  # stored = evaluated
    QC.save_quantized(tmp_path / "q.pt", gpt, records, {"kind": "target", "model_args": vars(gpt.config)}, quant)
    loaded, ckpt = QC.load_quantized(tmp_path / "q.pt")
    assert ckpt["quant"]["method"] == "awq"
    for k, v in gpt.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randint(0, 256, (2, 64), generator=gen(1))
    assert torch.equal(loaded(x)[0], gpt(x)[0])


def test_cli_quantizes_the_tiny_target_with_awq(tiny, tmp_path, capsys):
    shutil.copytree(tiny.out_dir / "data", tmp_path / "data")
    shutil.copy(tiny.out_dir / "target.pt", tmp_path / "target.pt")
    QC.main(["--method", "awq", "--bits", "4", "--ckpt", str(tmp_path / "target.pt"), "--out_dir", str(tmp_path),
             "--nsamples", "16", "--seed", "3"])
    assert "target      awq4" in capsys.readouterr().out
    model, ckpt = QC.load_quantized(tmp_path / "target_awq4.pt")
    quant = ckpt["quant"]
    assert quant["method"] == "awq" and quant["clip"] and quant["sym"] and quant["group_size"] == 0
    assert quant["calibration"] == dict(source="general", nsamples=16, tokens=model.config.block_size, seed=3)
    assert 0 < quant["rel_output_error"] < 0.05
    assert all("awq_scale" in r for r in ckpt["qweights"].values())
    assert QC.quant_name(QC.QuantConfig(method="awq", group_size=128, sym=False, clip=False)) == "awq4_g128_asym_noclip"


def test_the_tours_verdict_says_what_came_back_and_else_why_not():
    row = lambda exact: dict(forget_exact=exact)
    assert QC.verdict(row(0.1), row(0.5), row(1.0), row(0.9), 0.2, "rtn6").startswith("rtn6 brought 0.40 of")
    wiped = QC.verdict(row(0.0), row(0.0), row(1.0), row(0.1), None, "rtn4")
    assert wiped.startswith("nothing came back at rtn4: rtn4 wipes the target's own memorization too (1.00 -> 0.10)")
    kept = QC.verdict(row(0.0), row(0.05), row(1.0), row(1.0), 0.97, "rtn4")
    assert "keeps 0.97 of itself" in kept and "config/smollm2.py" in kept and "wipes" not in kept
