"""
Real pretrained weights: any local Hugging Face causal LM (GPT-2, Llama, ...) through the project's quantizers.

$ python quantize.py --hf DIR --method gptq --bits 4 --text FILE   # perplexity on FILE before and after

transformers is imported only here, and only local files are read (no download).
"""
import time
from pathlib import Path

import torch
import torch.nn as nn

import model as M
import quantize as Q
import quantize_cli as QC


def quantize_hf(cfg):
    """`python quantize.py --hf DIR`: quantize.py's quantizers on every Linear (and Conv1D) of a local Hugging Face
    causal LM except its output head (unless --lm_head). --text is cut in two: GPTQ calibrates on the first half,
    and perplexity before and after is measured on the second, so GPTQ is never scored on the text it was fitted
    to. Returns the two perplexities."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # only on this path
    if not Path(cfg.hf).is_dir():
        raise SystemExit(f"--hf {cfg.hf}: not a directory; give a local Hugging Face model directory")
    if not cfg.text or not Path(cfg.text).is_file():
        raise SystemExit(f"--hf needs --text FILE, a text file for calibration and perplexity (got {cfg.text!r})")
    if not any((Path(cfg.hf) / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise SystemExit(f"--hf {cfg.hf}: no tokenizer there (tokenizer.json, tokenizer.model or vocab.json); save "
                         f"the model's tokenizer into it with tokenizer.save_pretrained(DIR)")
    tok = AutoTokenizer.from_pretrained(cfg.hf, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(cfg.hf, local_files_only=True, dtype=torch.float32)
    model = model.to(M.pick_device(cfg.device)).eval()
    ids = torch.tensor(tok(Path(cfg.text).read_text())["input_ids"])
    if len(ids) < 32:
        raise SystemExit(f"--text {cfg.text}: only {len(ids)} tokens; give a longer text")
    calib, ids = ids[:len(ids) // 2], ids[len(ids) // 2:]  # GPTQ's calibration text, and the scored text
    ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 512)
    T = min(512, ctx, len(calib) - 1)
    head = model.get_output_embeddings()
    layers = {n: m for n, m in model.named_modules() if (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")
              and (cfg.lm_head or m is not head)}
    windows = Q.calibration_windows(calib, cfg.nsamples, T, cfg.seed) if cfg.method == "gptq" else None
    before, t0 = M.perplexity(model, ids, T), time.time()
    Q.quantize_layers(model, layers, cfg.method, cfg.bits, cfg.group_size, cfg.sym, windows, cfg.actorder, cfg.absmax)
    after = M.perplexity(model, ids, T)
    print(f"{cfg.hf}: {QC.quant_name(cfg)} on {len(layers)} layers in {time.time() - t0:.1f}s"
          + (f", calibrated on the first half of {cfg.text} ({len(calib)} tokens)" if windows is not None else "")
          + f"; perplexity on its second half ({len(ids)} tokens): {before:.3f} before, {after:.3f} after")
    return before, after
