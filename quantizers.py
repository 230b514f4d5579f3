"""
The quantizers, as pure functions of a weight matrix: round-to-nearest integers (2..8 bits, symmetric absmax or
asymmetric min-max, per output channel or per group of input columns), GPTQ, AWQ, and bitsandbytes' NF4/FP4
codebooks, with the packed storage of their codes. quantize.py applies them to a model's layers and is their
command line. Finding 1 of the study: 4-bit rounding can undo unlearning.
"""
import math

import torch
from torch.nn import functional as F

import model as M

METHODS = ("rtn", "gptq", "nf4", "fp4", "awq")
CALIBRATED = ("gptq", "awq")  # the methods that need calibration windows

# ----------------------------------------------------------------------------------------------------------------
# the uniform integer grid shared by RTN and GPTQ (GPTQ's quant.py: find params, quantize)

def quant_params(w, bits, sym=True, absmax=False):
    """Step Δ and zero point z of an N-bit grid for each row of w (..., k): codes q in [0, 2^N - 1], w ≈ Δ·(q - z).
    symmetric absmax, Zhang et al. 2024 (arXiv 2410.16454) Eq. 2: Δ = max|w| / 2^(N-1), z = 2^(N-1), i.e.
      Q(w) = Δ·round(w/Δ) on the signed grid -2^(N-1)..2^(N-1)-1; that grid has one level fewer above zero, so
      w = +max|w| clamps to (2^(N-1) - 1)·Δ, the only place the error exceeds Δ/2 (it is at most Δ).
    with absmax=True, LLM.int8's grid (Dettmers et al. 2022, arXiv 2208.07339, vector-wise quantization without
      the outlier path): Δ = max|w| / (2^(N-1) - 1), levels -(2^(N-1) - 1)..2^(N-1) - 1 (±127 at 8 bits), so
      ±max|w| lie on the grid and every entry is within Δ/2 of it; same z, same storage.
    asymmetric min-max (Frantar et al. 2022): Δ = (max - min) / (2^N - 1), z = round(-min/Δ), with min <= 0 <= max
      so that 0 is on the grid; every entry is within Δ/2 of it.
    Returns scale, zero of shape (..., 1)."""
    if sym:
        scale = w.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - absmax)
    else:
        lo, hi = w.amin(-1, keepdim=True).clamp(max=0), w.amax(-1, keepdim=True).clamp(min=0)
        scale = (hi - lo) / (2 ** bits - 1)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row: any step keeps it 0
    zero = torch.full_like(scale, 2 ** (bits - 1)) if sym else torch.round(-lo / scale)
    return scale, zero


def quantize(w, scale, zero, bits):
    """Integer codes q = clamp(round(w/Δ) + z, 0, 2^N - 1) (as floats; broadcasting w against scale, zero)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1)


def group_of(n, group_size, device=None):
    """The group of each of n input columns: column i is in group i // group_size (0: one group, per channel). When
    group_size does not divide n the last group is ragged (n % group_size columns), as in GPTQ's reference code."""
    return torch.arange(n, device=device) // (group_size or n)


def dequantize(q, scale, zero, group_size=0):
    """Q(w) = Δ·(q - z) for codes q (out, in) and scale, zero (out, n_groups) of contiguous column groups of
    group_size columns (0: in / n_groups, which must then divide; give it when the last group is ragged)."""
    g = group_size or q.shape[-1] // scale.shape[-1]
    j = group_of(q.shape[-1], g, q.device)
    return (q.float() - zero[..., j]) * scale[..., j]


def grouped(W, g):
    """W (out, in) as (out, n_groups, g), the last group padded with zeros: a zero changes neither max|w| nor the
    min-max range (which always includes 0), so every group's grid is that of its real columns alone."""
    return torch.nn.functional.pad(W, (0, -W.shape[1] % g)).unflatten(1, (-1, g))


def rtn(W, bits, group_size=0, sym=True, absmax=False):
    """Round-to-nearest of W (out, in): one grid per output channel (group_size 0) or per group of group_size
    consecutive input columns (the last one ragged if group_size does not divide in). Returns codes (out, in) and
    scale, zero (out, n_groups)."""
    Wg = grouped(W, group_size or W.shape[1])  # (out, n_groups, group)
    scale, zero = quant_params(Wg, bits, sym, absmax)
    return quantize(Wg, scale, zero, bits).flatten(1)[:, :W.shape[1]], scale[..., 0], zero[..., 0]

# ----------------------------------------------------------------------------------------------------------------
# GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization for Generative
# Pre-trained Transformers", arXiv 2210.17323), in the paper's and reference code's names

def inverse_cholesky(H, percdamp=0.01, tries=4):
    """Upper Cholesky factor U of (H + λI)⁻¹ = UᵀU, λ = percdamp · mean(diag H) (GPTQ §4, step 3: row i of U holds
    the updates of the columns after i). If H + λI is not positive-definite, λ grows ×10 and the run says so;
    after `tries` it is an error, never a silent fallback."""
    damp, eye = percdamp * H.diagonal().mean(), torch.eye(len(H), device=H.device)
    for _ in range(tries):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                return U
        print(f"gptq: H + {damp:.3g}·I is not positive-definite; re-damping with {10 * damp:.3g}")
        damp = 10 * damp
    raise ValueError(f"gptq: the Hessian is not positive-definite even with damping {damp / 10:.3g}: its "
                     f"calibration inputs are degenerate; use more calibration samples (--nsamples)")


def gptq(W, H, bits, group_size=0, sym=True, blocksize=128, percdamp=0.01, actorder=False, absmax=False):
    """GPTQ (Algorithm 1): quantize the columns of W (out, in) one at a time, minimizing ‖WX - QX‖² with
    H = 2XXᵀ from the calibration inputs X (in, n). Quantizing column i leaves error err = (w_i - q_i) / [U]_ii,
    which is spread over the columns still to quantize, W_F -= err · U_{i,F}, U the upper Cholesky factor of H⁻¹
    (the OBS update, Eq. 3). Lazy batch updates: within a block of `blocksize` columns (W1, Q1, Err1, Hinv1) the
    update is immediate; the columns after the block get it at once, W[:, i2:] -= Err1 · Hinv[i1:i2, i2:].
    Dead columns (H_ii = 0, an input that is always 0) get H_ii = 1 and weight 0. With groups, a group's grid is
    computed at its first column from the current, error-updated weights; with act-order (columns in order of
    decreasing H_ii) the groups stay contiguous in the original order and their grids are fixed up front
    (the reference's static groups), so that every method shares one checkpoint format.
    Returns Q (dequantized), codes, scale, zero in the original column order."""
    W, H = W.clone().float(), H.clone().float()
    ncol, g = W.shape[1], group_size or W.shape[1]
    dead = H.diagonal() == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scale, zero = (t[..., 0] for t in quant_params(grouped(W, g), bits, sym, absmax))  # (out, n_groups)
    perm = torch.argsort(H.diagonal(), descending=True) if actorder else torch.arange(ncol)
    W, H = W[:, perm], H[perm][:, perm]
    group = (perm // g).tolist()  # group (original order) of each column (quantization order)
    Hinv = inverse_cholesky(H, percdamp)
    Q, codes = torch.zeros_like(W), torch.zeros_like(W)
    if group_size:
        blocksize = group_size * max(1, blocksize // group_size)  # every group lies inside one block
    for i1 in range(0, ncol, blocksize):
        i2 = min(i1 + blocksize, ncol)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
        for i in range(i2 - i1):
            w, d, j = W1[:, i], Hinv1[i, i], group[i1 + i]
            if group_size and not actorder and (i1 + i) % group_size == 0:
                s, z = quant_params(W1[:, i:i + group_size], bits, sym, absmax)
                scale[:, j], zero[:, j] = s[:, 0], z[:, 0]
            codes[:, i1 + i] = q = quantize(w, scale[:, j], zero[:, j], bits)
            Q1[:, i] = (q - zero[:, j]) * scale[:, j]
            err = (w - Q1[:, i]) / d
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        Q[:, i1:i2] = Q1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return Q[:, inv], codes[:, inv], scale, zero

# ----------------------------------------------------------------------------------------------------------------
# AWQ (Lin, Tang, Tang, Yang, Chen, Wang, Xiao, Dang, Gan, Han 2024, "AWQ: Activation-aware Weight Quantization for
# LLM Compression and Acceleration", MLSys, arXiv 2306.00978), in the paper's and reference code's names

def awq_rtn(W, s, bits, group_size=0, sym=True, absmax=False, ratio=1.0):
    """Q(W·diag(s))·diag(s)⁻¹: RTN of the columns of W (out, in) scaled by s (in), each group's entries first clipped
    to ±ratio·max|w| of the group (ratio a number, or one per group, (out, n_groups, 1)), the result scaled back.
    Returns it (dequantized) and the codes, scale, zero of W·diag(s)."""
    Wg = grouped(W * s, group_size or W.shape[1])
    m = Wg.abs().amax(-1, keepdim=True) * ratio
    q, scale, zero = rtn(torch.clamp(Wg, -m, m).flatten(1)[:, :W.shape[1]], bits, group_size, sym, absmax)
    return dequantize(q, scale, zero, group_size) / s, q, scale, zero


def group_error(D, G, g):
    """‖D_j X_j‖² of each row and group j of g columns of D (out, in), from G = XᵀX (in, in): the output error of
    each group on its own, which AWQ's clip search minimizes (the cross terms between groups are left out).
    Returns (out, n_groups)."""
    pad = -len(G) % g
    Gj = F.pad(G, (0, pad, 0, pad)).unflatten(0, (-1, g)).unflatten(2, (-1, g)).diagonal(dim1=0, dim2=2)  # (g, g, J)
    return torch.einsum("oja,abj,ojb->oj", grouped(D, g), Gj, grouped(D, g))


def awq(W, X, bits, group_size=128, sym=False, absmax=False, clip=True, n_grid=20, max_shrink=0.5):
    """AWQ (Eq. 4-5): scale the input channels of W (out, in) by s before rounding and back after, so that the
    channels with large activations (the salient weights) lose less to rounding,
      s* = argmin_s ‖Q(W·diag(s))·(diag(s)⁻¹·X) - WX‖²,  s = s_X^α,  α* = argmin over α = i/n_grid, i < n_grid,
    s_X = mean over the tokens of |x| per input channel, from the calibration inputs X (n, in); as the reference
    (auto_scale.py), s is clamped to >= 1e-4 and normalised to s / sqrt(max(s)·min(s)). Then, with clip, the clip
    search of the reference (auto_clip.py, "mse_range"): each group of W·diag(s) is clipped to ±r·max|w|,
    r = 1 - i/n_grid for i < max_shrink·n_grid, r chosen per row and group for the least error of that group's
    output. The output error is tr(D XᵀX Dᵀ), D = W - Q, over all the calibration tokens.
    The reference moves diag(s)⁻¹ into the op before the layer (LayerNorm, previous Linear) to run the scaled integer
    weights; here the layer keeps Q(W·diag(s))·diag(s)⁻¹ itself, the same function, and the checkpoint stores s.
    Defaults are AWQ's (asymmetric min-max, groups of 128). Returns Q (dequantized), codes, scale, zero, s, α."""
    W, X = W.float(), X.float()
    G, s_X = X.T @ X, X.abs().mean(0)
    alphas = [i / n_grid for i in range(n_grid)]
    scales = [s / (s.max() * s.min()).sqrt() for s in (s_X.pow(a).clamp(min=1e-4) for a in alphas)]
    err = torch.stack([group_error(W - awq_rtn(W, s, bits, group_size, sym, absmax)[0], G, len(G)).sum()
                       for s in scales])
    i = err.argmin().item()  # the first (smallest) α on ties: α = 0, s = 1, is RTN
    ratio = 1.0
    if clip:
        g, ratios = group_size or W.shape[1], torch.tensor([1 - j / n_grid for j in range(int(max_shrink * n_grid))])
        err = torch.stack([group_error(W - awq_rtn(W, scales[i], bits, group_size, sym, absmax, r)[0], G, g)
                           for r in ratios.tolist()])  # (ratios, out, n_groups)
        ratio = ratios.to(W.device)[err.argmin(0)][..., None]  # ties: the widest range
    return *awq_rtn(W, scales[i], bits, group_size, sym, absmax, ratio), scales[i], alphas[i]

# ----------------------------------------------------------------------------------------------------------------
# NF4 / FP4: bitsandbytes' 4-bit codebooks with absmax per block of 64 (Dettmers et al. 2023, QLoRA, arXiv 2305.14314)

# The level of each 4-bit code, as bitsandbytes stores them (bitsandbytes/functional.py, get_4bit_type; the same
# numbers as dDequantizeNF4 / dDequantizeFP4Tree in csrc/kernels.cu). NF4: quantiles of N(0, 1) scaled to [-1, 1].
NF4 = torch.tensor([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                    0.7229568362236023, 1.0])
# FP4 (E2M1, no inf/nan): bit 3 is the sign; get_4bit_type lists these values and divides them by their max, 12
FP4 = torch.tensor([0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]) / 12
CODEBOOKS = {"nf4": NF4, "fp4": FP4}


def codebook_quantize(w, levels, blocksize=64):
    """Blockwise 4-bit quantization as bitsandbytes' quantize_4bit: flatten w, cut it into blocks of 64, scale each
    block by its absmax a = max|w| into [-1, 1], keep the index of the nearest level: w ≈ a · levels[q].
    Returns codes (shape of w) and absmax (one per block)."""
    levels = levels.to(w.device)
    x = F.pad(w.flatten().float(), (0, -w.numel() % blocksize)).view(-1, blocksize)
    absmax = x.abs().amax(1)
    absmax = torch.where(absmax == 0, torch.ones_like(absmax), absmax)
    order = levels.argsort()
    mids = (levels[order][1:] + levels[order][:-1]) / 2  # nearest level = bucket between midpoints
    q = order[torch.bucketize(x / absmax[:, None], mids)]
    return q.flatten()[:w.numel()].view(w.shape), absmax


def codebook_dequantize(q, absmax, levels, blocksize=64):
    """w ≈ absmax · levels[q], block by block."""
    x = F.pad(levels.to(q.device)[q.flatten().long()], (0, -q.numel() % blocksize)).view(-1, blocksize)
    return (x * absmax[:, None]).flatten()[:q.numel()].view(q.shape)

# ----------------------------------------------------------------------------------------------------------------
# storage: codes as a bit stream, so two 4-bit codes share a byte and 2- and 3-bit codes take 2 and 3 bits

def pack(q, bits):
    """Integer codes (any shape, 0 <= q < 2^bits) -> uint8 bit stream, code i in bits [i·bits, (i+1)·bits),
    least significant first: at 4 bits, byte i = q[2i] | q[2i+1] << 4."""
    b = (q.flatten().to(torch.uint8)[:, None] >> torch.arange(bits, dtype=torch.uint8, device=q.device)) & 1
    b = F.pad(b.flatten(), (0, -b.numel() % 8)).view(-1, 8)
    return (b << torch.arange(8, dtype=torch.uint8, device=q.device)).sum(1, dtype=torch.uint8)


def unpack(packed, bits, n):
    """The first n codes of a bit stream made by pack, as uint8."""
    b = (packed[:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    b = b.flatten()[:n * bits].view(n, bits)
    return (b << torch.arange(bits, dtype=torch.uint8, device=packed.device)).sum(1, dtype=torch.uint8)


def quantize_weight(W, method, bits=4, group_size=0, sym=True, H=None, actorder=False, absmax=False, X=None, clip=True):
    """Quantize one weight (out, in) -> (Q dequantized, record to store: packed codes, scale, zero if asymmetric;
    AWQ's per-input-channel scale s and its α too). GPTQ needs the Hessian H, AWQ the calibration inputs X (n, in)."""
    extra = {}
    if method in CODEBOOKS:
        q, scale = codebook_quantize(W, CODEBOOKS[method])
        Q, zero = codebook_dequantize(q, scale, CODEBOOKS[method]), None
    else:
        if method == "gptq":
            Q, q, scale, zero = gptq(W, H, bits, group_size, sym, actorder=actorder, absmax=absmax)
        elif method == "awq":
            Q, q, scale, zero, s, alpha = awq(W, X, bits, group_size, sym, absmax, clip)
            extra = {"awq_scale": s, "alpha": alpha}
        else:
            q, scale, zero = rtn(W, bits, group_size, sym, absmax)
            Q = dequantize(q, scale, zero, group_size)
    rec = {"codes": pack(q, bits), "scale": scale, "shape": list(W.shape), **extra}
    if not sym and method not in CODEBOOKS:
        rec["zero"] = zero.to(torch.uint8)
    return Q, rec


def dequantize_record(rec, quant):
    """The dequantized weight (out, in) of a stored record."""
    bits, shape = quant["bits"], rec["shape"]
    q = unpack(rec["codes"], bits, math.prod(shape)).view(shape)
    if quant["method"] in CODEBOOKS:
        return codebook_dequantize(q, rec["scale"], CODEBOOKS[quant["method"]])
    zero = rec["zero"].float() if "zero" in rec else torch.full_like(rec["scale"], 2 ** (bits - 1))
    Q = dequantize(q, rec["scale"], zero, quant["group_size"])
    return Q / rec["awq_scale"] if "awq_scale" in rec else Q  # AWQ: Q(W·diag(s))·diag(s)⁻¹

# ----------------------------------------------------------------------------------------------------------------
# whole models: layers in forward order, GPTQ's and AWQ's inputs taken with the earlier layers already quantized

def check(method, bits):
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; the methods are {', '.join(METHODS)}")
    if method in CODEBOOKS and bits != 4:
        raise ValueError(f"{method} is a 4-bit codebook; use --bits 4 with it (or --method rtn/gptq/awq for {bits} "
                         f"bits)")
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be one of 2, 3, 4, 5, 6, 7, 8; got {bits}")


def weight_view(layer):
    """The weight as (out, in): transformers' GPT-2 uses Conv1D, weight (in, out), y = x·W + b; a view, so writes
    go through to the layer."""
    return layer.weight.data.T if type(layer).__name__ == "Conv1D" else layer.weight.data


def quantized_layers(model, lm_head=False):
    """What gets quantized: the block Linears; with lm_head, the output head too (tied to the token embedding)."""
    return {**M.block_linears(model), **({"lm_head": model.lm_head} if lm_head else {})}
