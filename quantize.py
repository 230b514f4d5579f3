"""
Quantize a model: quantizers.py's quantizers applied to the Linear layers of the transformer blocks (GPTQ and AWQ
layer by layer on calibration windows), a packed checkpoint, and the before/after table of what came back.

$ python quantize.py --bits 4                         # the newest out/<method>.pt, RTN int4 -> out/<method>_rtn4.pt
$ python quantize.py --bits 8 --absmax --ckpt out/target.pt   # int8: LLM.int8's grid, without its outlier path
$ python quantize.py --method gptq --bits 4 --group_size 128 --no-sym
$ python quantize.py --method awq --bits 4 --group_size 128 --no-sym   # AWQ's own setting; --no-clip: scales only
$ python quantize.py --method nf4                     # or fp4: absmax per block of 64, as bitsandbytes
$ python quantize.py --hf DIR --method gptq --bits 4 --text FILE   # any local Hugging Face causal LM
"""
import copy
import io
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import metrics
import model as M
from data.prepare import check_tokenizer, load_data
from quantizers import CALIBRATED, CODEBOOKS, METHODS, check, dequantize_record, quantize_weight, quantized_layers, \
    weight_view
from settings import atomic_write_bytes, check_range, cli
from unlearn import METHODS as UNLEARNED


# ----------------------------------------------------------------------------------------------------------------
# the quantizers on a model's layers

def calibration_windows(stream, nsamples, T, seed):
    """nsamples windows of T tokens at seeded random offsets of a token stream (GPTQ's calibration set)."""
    if len(stream) <= T:
        raise ValueError(f"calibration text has {len(stream)} tokens; it needs more than one window of {T}")
    starts = torch.randint(len(stream) - T, (nsamples,), generator=torch.Generator().manual_seed(seed))
    return torch.stack([stream[s:s + T] for s in starts.tolist()])


@torch.no_grad()
def layer_inputs(model, layers, windows, fn, batch_size=16):
    """Runs the windows through the model and calls fn(name, X) with each layer's inputs X (n, in)."""
    def hook(name):
        def f(mod, args):  # returns None: a pre-hook that returned something would replace the layer's inputs
            fn(name, args[0].reshape(-1, args[0].shape[-1]).float())
        return f
    hooks = [layer.register_forward_pre_hook(hook(n)) for n, layer in layers.items()]
    dev = next(model.parameters()).device
    try:
        for x in windows.split(batch_size):
            model(x.to(dev))
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def quantize_layers(model, layers, method, bits=4, group_size=0, sym=True, windows=None, actorder=False,
                    absmax=False, clip=True):
    """Quantizes the layers (name -> nn.Linear or Conv1D) of a float32 model, replacing each weight by its dequantized
    value, exactly (a bf16 model is refused: its weights cannot hold the grid's levels); returns name -> record.
    GPTQ is sequential, as the reference's true-sequential mode: layer l's Hessian H = 2XXᵀ/n comes
    from its inputs X with every layer before it already quantized. One forward pass of all the calibration windows
    does it: a hook on each layer takes X as the pass reaches the layer, quantizes the weight there, and the layer
    then runs quantized, so the layers after it see quantized inputs. (All windows form one batch: H needs every
    token before the layer is quantized.) AWQ takes its X in the same pass, for its scales and its clip search (with
    clip); its reference takes them from the full-precision model instead."""
    check(method, bits)
    low = [n for n, layer in layers.items() if layer.weight.dtype != torch.float32]
    if low:  # Q's levels written into a bf16 weight would be rounded again, off the grid (int8: by up to 0.46 Δ)
        raise ValueError(f"{low[0]} is {str(layers[low[0]].weight.dtype)[6:]}: quantize a float32 copy "
                         f"(model.to_dtype(model, torch.float32)), so that it holds exactly the quantizer's values")
    records = {}
    if method not in CALIBRATED:
        for name, layer in layers.items():
            W = weight_view(layer)
            Q, records[name] = quantize_weight(W.float(), method, bits, group_size, sym, None, actorder, absmax)
            W.copy_(Q)
        return records
    if windows is None:
        raise ValueError(f"{method} needs calibration windows")

    def quantize_here(name, X):
        if name in records:  # a layer called twice in one forward pass is quantized at its first call
            return
        W = weight_view(layers[name])
        H = 2 * X.T @ X / len(X) if method == "gptq" else None
        Q, records[name] = quantize_weight(W.float(), method, bits, group_size, sym, H, actorder, absmax, X, clip)
        W.copy_(Q)
    layer_inputs(model, layers, windows, quantize_here, batch_size=len(windows))
    missing = [n for n in layers if n not in records]
    if missing:
        raise ValueError(f"{missing[0]}: the calibration forward pass never reached this layer")
    return {n: records[n] for n in layers}


def output_reference(model, layers, windows):
    """What output_error compares against: each layer's inputs X (n, in) on the windows in the unquantized model and
    its output's ‖XWᵀ‖². One forward pass; the same for every quantizer of one model (evaluate.py reads several)."""
    X = {n: [] for n in layers}
    layer_inputs(model, layers, windows, lambda name, x: X[name].append(x))
    X = {n: torch.cat(v) for n, v in X.items()}
    return {n: (X[n], (X[n] @ weight_view(layer).float().T).square().sum()) for n, layer in layers.items()}


def output_error(layers, reference, quantize_fn):
    """Runs quantize_fn() (which quantizes layers in place) and returns the mean over layers of the relative output
    error ‖X(W - Q)ᵀ‖² / ‖XWᵀ‖² on the inputs X of each layer of the unquantized model (output_reference)."""
    W = {n: weight_view(layer).float().clone() for n, layer in layers.items()}
    out = quantize_fn()
    errs = [(reference[n][0] @ (W[n] - weight_view(layer).float()).T).square().sum() / reference[n][1]
            for n, layer in layers.items()]
    return out, torch.stack(errs).mean().item()

# ----------------------------------------------------------------------------------------------------------------
# quantized checkpoints: everything of the input checkpoint, the quantized weights replaced by packed codes + scales

def save_quantized(path, model, records, ckpt, quant, metrics=None):
    """Writes {**ckpt, model: the other tensors, quant: settings, qweights: name -> record, metrics} atomically.
    The input's metrics, measured at full precision, are not carried over: metrics are the quantized model's own
    (left out when not given)."""
    ptrs = {model.get_parameter(f"{n}.weight").data_ptr() for n in records}
    state = {k: v for k, v in model.state_dict().items() if v.data_ptr() not in ptrs}  # tied copies go too
    buf = io.BytesIO()
    ckpt = {k: v for k, v in ckpt.items() if k != "metrics"}
    torch.save({**ckpt, "model": state, "quant": quant, "qweights": records,
                **({"metrics": metrics} if metrics is not None else {})}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_quantized(path, device="cpu"):
    """(float32 model with the dequantized weights, checkpoint dict) of a checkpoint written by save_quantized."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path}: no such checkpoint; `python quantize.py --ckpt out/MODEL.pt` makes one")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # torch and pickle raise many kinds for a bad file; all of them mean the same here
        raise SystemExit(f"{path}: not a nanoUnlearn quantized checkpoint, or a damaged one ({type(e).__name__}: "
                         f"{str(e)[:200]}); `python quantize.py --ckpt out/MODEL.pt` writes one") from None
    if "quant" not in ckpt:
        raise SystemExit(f"{path} is not quantized: load it with model.load_checkpoint")
    model = M.to_dtype(M.from_args(ckpt["model_args"]).to(device), torch.float32)  # holds the levels exactly
    keys = model.load_state_dict(ckpt["model"], strict=False)
    if keys.unexpected_keys:
        raise SystemExit(f"{path}: tensors this model does not have: {keys.unexpected_keys[:5]}")
    missing = set(keys.missing_keys)
    with torch.no_grad():
        for name, rec in ckpt["qweights"].items():
            p = model.get_parameter(f"{name}.weight")
            p.copy_(dequantize_record(rec, ckpt["quant"]))
            missing -= {k for k, v in model.state_dict().items() if v.data_ptr() == p.data_ptr()}
    if missing:
        raise SystemExit(f"{path}: tensors missing from the checkpoint: {sorted(missing)}")
    return model.eval(), ckpt


# ----------------------------------------------------------------------------------------------------------------
# the command line

@dataclass
class QuantConfig:
    ckpt: str = ""  # checkpoint to quantize; empty = the newest out/<method>.pt of the unlearning scripts
    method: str = "rtn"  # rtn | gptq | awq | nf4 | fp4
    bits: int = 4  # 2..8 for rtn, gptq and awq (8 = int8 per channel); nf4 and fp4 are 4-bit
    group_size: int = 0  # 0 = one grid per output channel; 32/64/128 = per group of input columns
    sym: bool = True  # symmetric absmax (the paper's Eq. 2); --no-sym = asymmetric min-max
    absmax: bool = False  # symmetric grid with levels ±(2^(N-1)-1), Δ = max|w|/(2^(N-1)-1): LLM.int8's (named intN)
    actorder: bool = False  # gptq: quantize columns in order of decreasing Hessian diagonal
    clip: bool = True  # awq: also search each group's clipping range (the reference's auto_clip, on by default there)
    lm_head: bool = False  # also quantize lm_head (tied to the token embedding, so that too)
    nsamples: int = 128  # gptq, awq: calibration windows of block_size tokens from the calibration text
    calib: str = "general"  # gptq, awq: calibration text: general (held-in general corpus) | retain (the retain set)
    seed: int = 1337  # draws the calibration windows
    out_dir: str = "out"  # where checkpoints are read, and the quantized one written
    device: str = "auto"  # 'auto' = cuda if present, else cpu
    hf: str = ""  # a local Hugging Face causal LM directory: quantize it, perplexity on --text before and after
    text: str = ""  # with --hf: the text file for calibration and perplexity

    def __post_init__(self):
        check_range(self, bits="2..8", group_size=">= 0", nsamples=">= 1")
        if self.calib not in CALIBRATION:
            raise ValueError(f"--calib {self.calib}: the calibration texts are {', '.join(CALIBRATION)}")
        if self.method not in METHODS:
            raise ValueError(f"--method {self.method}: the methods are {', '.join(METHODS)}")
        if self.absmax and (not self.sym or self.method in CODEBOOKS):
            raise ValueError("--absmax is a symmetric integer grid: use it with --method rtn, gptq or awq and --sym")


def quant_name(cfg):
    """e.g. rtn4, rtn4_g64_asym, gptq4_act, awq4_g128_asym, awq4_noclip, gptq4_retain, nf4; int8 for RTN on
    LLM.int8's grid."""
    method = "int" if cfg.absmax and cfg.method == "rtn" else cfg.method + ("_absmax" if cfg.absmax else "")
    name = method + (str(cfg.bits) if cfg.method in ("rtn", "gptq", "awq") else "")
    return (name + (f"_g{cfg.group_size}" if cfg.group_size else "") + ("" if cfg.sym else "_asym")
            + ("_act" if cfg.actorder and cfg.method == "gptq" else "")
            + ("_noclip" if not cfg.clip and cfg.method == "awq" else "")
            + (f"_{cfg.calib}" if cfg.calib != "general" and cfg.method in CALIBRATED else ""))


CALIBRATION = ("general", "retain")


def calibration_text(data, calib):
    """The token stream GPTQ's and AWQ's windows are drawn from: `general`, the general corpus's training part (the
    quantizers' usual generic text, never scored); `retain`, the retain set's sequences end to end: text of the forget
    set's own kind (facts are drawn by one generator for every split, data/prepare.py), so a quantizer calibrated on it
    minimizes its output error where the forgotten text lives, yet never sees a forget sequence."""
    if calib == "general":
        return data.general_train
    seqs = data.split("retain")
    return seqs.x[seqs.mask]  # row by row: the sequences end to end, without their padding


def heldout_reference(model, cfg, data):
    """output_reference of the layers cfg quantizes, on 8 windows of held-out general text drawn with cfg.seed."""
    windows = calibration_windows(data.general_val, 8, model.config.block_size, cfg.seed)
    return output_reference(model, quantized_layers(model, cfg.lm_head), windows)


def quantize_with(model, cfg, data, reference=None):
    """Quantizes a GPT in place with a QuantConfig: GPTQ and AWQ calibrated on cfg.calib's text (calibration_text;
    never the forget set); returns the records and the quant block, with the seconds it took and the mean relative
    output error on held-out general text (against reference, heldout_reference(model, cfg, data) if None)."""
    T, windows = model.config.block_size, None
    if cfg.method in CALIBRATED:
        windows = calibration_windows(calibration_text(data, cfg.calib), cfg.nsamples, T, cfg.seed)

    def run():
        t0 = time.time()
        return quantize_layers(model, quantized_layers(model, cfg.lm_head), cfg.method, cfg.bits, cfg.group_size,
                               cfg.sym, windows, cfg.actorder, cfg.absmax, cfg.clip), time.time() - t0
    if reference is None:
        reference = heldout_reference(model, cfg, data)
    (records, seconds), err = output_error(quantized_layers(model, cfg.lm_head), reference, run)
    calibration = dict(source=cfg.calib, nsamples=cfg.nsamples, tokens=T, seed=cfg.seed)
    quant = dict(method=cfg.method, bits=cfg.bits, group_size=cfg.group_size, sym=cfg.sym, absmax=cfg.absmax,
                 actorder=cfg.actorder, clip=cfg.clip and cfg.method == "awq", lm_head=cfg.lm_head,
                 seconds=round(seconds, 2), rel_output_error=err,
                 calibration=calibration if windows is not None else None)
    return records, quant


def newest_unlearned(out_dir):
    found = [p for p in (Path(out_dir) / f"{m}.pt" for m in UNLEARNED) if p.exists()]
    if not found:
        raise SystemExit(f"no unlearned checkpoint in {out_dir}/ ({', '.join(m + '.pt' for m in list(UNLEARNED)[:3])}, "
                         f"...): make one with `python unlearn_ga.py`, or pass --ckpt {out_dir}/target.pt")
    return max(found, key=lambda p: p.stat().st_mtime)


def quantize_checkpoint(cfg):
    """Quantizes the input checkpoint and out/target.pt the same way; prints each before and after."""
    dev, out = M.pick_device(cfg.device), Path(cfg.out_dir)
    path, target = Path(cfg.ckpt) if cfg.ckpt else newest_unlearned(out), out / "target.pt"
    if not target.exists():
        print(f"{target} not found (`python train.py` makes it): no target rows in the table")
    rows, data, full = {}, None, []
    for p in [path] + ([target] if target.exists() and target.resolve() != path.resolve() else []):
        model, ckpt = M.load_checkpoint(p, dev)
        stored = str(next(model.parameters()).dtype)[6:]
        model = M.to_dtype(model, torch.float32)  # exact for bf16 weights; the quantized ones must hold Q's levels
        data = data or load_data(ckpt.get("data"), out)
        measure = lambda: {**M.memorization(model, data, ("forget", "retain")),
                           "ppl": M.perplexity(model, data.general_val)}
        rows[p.stem, stored] = measure()
        full.append(copy.deepcopy(model))  # unquantized, for the mechanism below
        records, quant = quantize_with(model, cfg, data)
        rows[p.stem, quant_name(cfg)] = {**measure(), **quant}
        if p == path:
            dest = out / f"{path.stem}_{quant_name(cfg)}.pt"
            save_quantized(dest, model, records, ckpt, {**quant, "source": str(path)}, rows[p.stem, quant_name(cfg)])
            qbytes = sum(t.numel() * t.element_size() for r in records.values() for t in r.values()
                         if torch.is_tensor(t))
            fbytes = sum(4 * math.prod(r["shape"]) for r in records.values())
            print(f"wrote {dest}: quantized tensors {qbytes / 1e6:.2f} MB ({qbytes / fbytes:.2f}x their float32 "
                  f"size); quantizing took {quant['seconds']}s")
    print(f"{'model':<12}{'precision':<18}{'forget exact':>13}{'forget MA':>10}{'retain exact':>13}{'retain MA':>10}"
          f"{'ppl':>9}{'out err':>9}")
    for (name, prec), r in rows.items():
        print(f"{name:<12}{prec:<18}{r['forget_exact']:13.3f}{r['forget_ma']:10.3f}{r['retain_exact']:13.3f}"
              f"{r['retain_ma']:10.3f}{r['ppl']:9.2f}" + (f"{r['rel_output_error']:9.1e}" if "seconds" in r else ""))
    if len(rows) == 4:  # retained knowledge (README): the input's forget exact-match over the target's, same precision
        (a, ra), (_, rq), (t, ta), (_, tq) = rows.items()
        share = lambda u, v: f"{100 * u['forget_exact'] / v['forget_exact']:.0f}%" if v["forget_exact"] else "n/a"
        print(f"forget exact-match of {a[0]} as a share of {t[0]}'s: {share(ra, ta)} at {a[1]}, "
              f"{share(rq, tq)} at {quant_name(cfg)}")
        kept = metrics.mechanism(full[1], full[0], quant)["all"]["kept"] if cfg.method in ("rtn", *CODEBOOKS) else None
        print(verdict(ra, rq, ta, tq, kept, quant_name(cfg)))


def verdict(unlearned, unlearned_q, target, target_q, kept, name):
    """What the tour's table shows (forget exact match of the unlearned model and the target, unquantized and at
    precision `name`; kept: metrics.mechanism's share of the unlearning update that survives rounding, or None),
    and, where nothing came back, why, and which command shows the recovery (RESULTS.md, section 1)."""
    why = [f"the rounded update keeps {kept:.2f} of itself (metrics.mechanism; 0 would mean every moved weight "
           f"rounds back to the target's code)"] if kept is not None else []
    back = unlearned_q["forget_exact"] - unlearned["forget_exact"]
    if back >= 0.1:
        return f"{name} brought {back:.2f} of the forget set's exact match back" + (f": {why[0]}" if why else "")
    if target_q["forget_exact"] < target["forget_exact"] / 2:
        why.append(f"{name} wipes the target's own memorization too ({target['forget_exact']:.2f} -> "
                   f"{target_q['forget_exact']:.2f}), so there is nothing for it to bring back")
    return (f"nothing came back at {name}" + (f": {'; '.join(why)}" if why else "") + ". The recovery of Zhang et "
            "al. 2024 shows on a real model, at the precision that hurts it as 4 bits hurt their 7B one: "
            "`python evaluate.py config/smollm2.py` (RESULTS.md, section 1), then this table of its models: "
            "`python quantize.py --out_dir out_smollm2 --bits 5`.")


# ----------------------------------------------------------------------------------------------------------------
# `python quantize.py --hf DIR`

def quantize_hf(cfg):
    """`python quantize.py --hf DIR`: the quantizers on every Linear (and Conv1D) of a local Hugging Face
    causal LM except its output head (unless --lm_head). --text is cut in two: GPTQ calibrates on the first half,
    and perplexity before and after is measured on the second, so GPTQ is never scored on the text it was fitted
    to. Returns the two perplexities."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # only on this path
    if not Path(cfg.hf).is_dir():
        raise SystemExit(f"--hf {cfg.hf}: not a directory; give a local Hugging Face model directory")
    if not cfg.text or not Path(cfg.text).is_file():
        raise SystemExit(f"--hf needs --text FILE, a text file for calibration and perplexity (got {cfg.text!r})")
    check_tokenizer(cfg.hf, "--hf")
    tok = AutoTokenizer.from_pretrained(cfg.hf, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(cfg.hf, local_files_only=True, dtype=torch.float32)
    model = model.to(M.pick_device(cfg.device)).eval()
    ids = torch.tensor(tok(Path(cfg.text).read_text())["input_ids"])
    if len(ids) < 32:
        raise SystemExit(f"--text {cfg.text}: only {len(ids)} tokens; give a longer text")
    calib, ids = ids[:len(ids) // 2], ids[len(ids) // 2:]  # GPTQ's and AWQ's calibration text, and the scored text
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 512)
    T = min(512, ctx, len(calib) - 1)
    head = model.get_output_embeddings()
    layers = {n: m for n, m in model.named_modules() if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
              and (cfg.lm_head or m is not head)}
    windows = calibration_windows(calib, cfg.nsamples, T, cfg.seed) if cfg.method in CALIBRATED else None
    before, t0 = M.perplexity(model, ids, T), time.time()
    quantize_layers(model, layers, cfg.method, cfg.bits, cfg.group_size, cfg.sym, windows, cfg.actorder, cfg.absmax,
                      cfg.clip)
    after = M.perplexity(model, ids, T)
    print(f"{cfg.hf}: {quant_name(cfg)} on {len(layers)} layers in {time.time() - t0:.1f}s"
          + (f", calibrated on the first half of {cfg.text} ({len(calib)} tokens)" if windows is not None else "")
          + f"; perplexity on its second half ({len(ids)} tokens): {before:.3f} before, {after:.3f} after")
    return before, after


def main(argv=None):
    (cfg,) = cli(__doc__, QuantConfig, argv=argv)
    try:
        check(cfg.method, cfg.bits)
        if cfg.hf:
            quantize_hf(cfg)
        else:
            quantize_checkpoint(cfg)
    except ValueError as e:
        raise SystemExit(str(e)) from None


if __name__ == "__main__":
    main()
