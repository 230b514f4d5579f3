"""
A small GPT that memorizes, and what every other script asks of it: greedy decoding, per-sequence scores from one
teacher-forced pass (memorization accuracy, exact match, log-likelihood), perplexity, and checkpoints.

nanoGPT's model (GPT-2's module names, so Hugging Face GPT-2 weights load), trained by train.py into the three
models the study compares: base (general text), target (base fine-tuned on general + forget + retain until the
memorized sets are memorized) and retrain (the same without the forget set). `python model.py` runs train.py.

$ python model.py                      # trains what is missing, writes out/{base,target,retrain}.pt and out/train.json
$ python model.py --force              # retrains everything
$ python model.py --dtype bfloat16     # pure bf16 weights, no float32 master copy
"""
import functools
import hashlib
import io
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F


# ----------------------------------------------------------------------------------------------------------------
# the model: nanoGPT with GPT-2's module names

@dataclass
class GPTConfig:
    block_size: int = 47  # longest input: the data's seq_len - 1 (a sequence's last token is only ever a target)
    vocab_size: int = 4096  # set from the data's compact vocabulary
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    bias: bool = True  # biases in Linear layers and LayerNorms, as GPT-2


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if cache is not None:  # generation: keys and values of the earlier positions are kept, not recomputed
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)  # one new query sees every cached key
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as GPT-2
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if pn.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None, caches=None, pos0=0):
        """idx (B, T) -> logits (B, T, V); loss = mean cross-entropy over targets != -1 (None without targets)."""
        T = idx.size(1)
        if pos0 + T > self.config.block_size:
            raise ValueError(f"sequence of {pos0 + T} tokens exceeds block_size {self.config.block_size}")
        pos = torch.arange(pos0, pos0 + T, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for i, block in enumerate(self.transformer.h):
            x = block(x, None if caches is None else caches[i])
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        return logits, lm_loss(logits, targets)

    @property
    def blocks(self):
        """The transformer blocks, in forward order (block_linears selects inside them)."""
        return self.transformer.h

    def new_cache(self):
        """An empty KV cache for greedy(): one dict per block, which CausalSelfAttention fills."""
        return [{} for _ in self.transformer.h]

    @classmethod
    def from_pretrained(cls, local_dir):
        """GPT-2-family Hugging Face weights from a local directory (no download). transformers stores the four
        attention/MLP projections as Conv1D, weight (in, out): they are transposed into our nn.Linear (out, in)."""
        from transformers import GPT2LMHeadModel  # only on this path
        hf = GPT2LMHeadModel.from_pretrained(local_dir)
        c = hf.config
        model = cls(GPTConfig(block_size=c.n_positions, vocab_size=c.vocab_size, n_layer=c.n_layer,
                              n_head=c.n_head, n_embd=c.n_embd, bias=True))
        sd, sd_hf = model.state_dict(), hf.state_dict()
        keys = [k for k in sd_hf if not k.endswith((".attn.bias", ".attn.masked_bias"))]
        assert len(keys) == len(sd), f"{local_dir}: {len(keys)} tensors, a GPT of this shape has {len(sd)}"
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        with torch.no_grad():
            for k in keys:
                w = sd_hf[k].t() if k.endswith(conv1d) else sd_hf[k]
                assert w.shape == sd[k].shape, f"{k}: {tuple(w.shape)} vs {tuple(sd[k].shape)}"
                sd[k].copy_(w)
        return model


def lm_loss(logits, targets):
    """The loss of every model here: mean cross-entropy, in float32, over the targets != -1 (None without targets)."""
    if targets is None:
        return None
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)


def block_linears(model):
    """The Linear layers inside the transformer blocks (model.blocks), in forward order: what the quantizers quantize
    and SURE and MemFlex select among; never the embeddings or the output head. The same for our GPT and for a
    Hugging Face model wrapped by pretrained.py (whose GPT-2 family has Conv1D layers, Linears stored transposed)."""
    inside = {id(m) for block in model.blocks for m in block.modules()}
    return {n: m for n, m in model.named_modules()
            if id(m) in inside and (isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D")}


def weight_dtype(name):
    """--dtype: float32, or bfloat16 for pure bf16 weights (and optimizer state: no float32 master copy)."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise SystemExit(f"--dtype {name}: use float32 or bfloat16")
    return dtypes[name]


# ----------------------------------------------------------------------------------------------------------------
# pure bf16 at float32 speed: bf16 storage, with the arithmetic in bf16 only where the hardware does it fast

@functools.lru_cache
def bf16_native(device):
    """Whether bf16 arithmetic is fast on the device, decided by a short timing rather than a CPU name: on CUDA, yes;
    on a CPU, a (256, 576) x (576, 1536) matmul, one thread, median of 5, in bf16 against float32. Native when bf16
    takes at most 2x float32's time: with AMX or AVX512-BF16 it is faster than float32, and torch emulates it
    elsewhere (10x slower on an AVX2-only CPU), so the margin keeps a loaded machine from flipping the choice."""
    if device.startswith("cuda"):
        return True
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        def median(dtype):
            gen = torch.Generator().manual_seed(0)  # the global generator stays untouched
            a, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((256, 576), (576, 1536)))
            a @ b  # warm-up
            times = []
            for _ in range(5):
                t = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t)
            return sorted(times)[2]
        return median(torch.bfloat16) <= 2 * median(torch.float32)
    finally:
        torch.set_num_threads(threads)


def compute_dtype(dtype, device):
    """The dtype a model of storage dtype `dtype` computes in: bf16 where bf16_native, else float32, whose numbers
    hold bf16 values exactly (adamw rounds them back after every step)."""
    return torch.float32 if dtype == torch.bfloat16 and not bf16_native(device) else dtype


def store_bf16(opt, args=None, kwargs=None):
    """Rounds every parameter of the optimizer and its state (AdamW's two moments; not the step count) to the
    nearest bf16 number, in place: what a pure-bf16 step stores. An update below half a bf16 spacing is lost, as
    in pure bf16 (a model loaded in bf16 and trained with no float32 master copy, the paper's setting)."""
    with torch.no_grad():
        for group in opt.param_groups:
            for p in group["params"]:
                p.copy_(p.bfloat16())
                for k, v in opt.state[p].items():
                    if k != "step" and torch.is_tensor(v) and v.is_floating_point():
                        v.copy_(v.bfloat16())


def adamw(params, dtype, **kw):
    """torch's AdamW for parameters stored in dtype: float32 parameters stored as bf16 (compute_dtype) are rounded
    back to bf16 after each step (store_bf16), so that only the arithmetic differs from a native bf16 step."""
    params = list(params)
    opt = torch.optim.AdamW(params, **kw)
    if dtype == torch.bfloat16 and any(p.dtype == torch.float32 for p in params):
        opt.register_step_post_hook(store_bf16)
    return opt


def to_dtype(model, dtype):
    """Casts the model's parameters to dtype, in place, and returns it. Buffers keep their own
    dtype: a Llama's RoPE frequencies (inv_freq) stay float32, as transformers keeps them, where model.to(dtype)
    would round them to bf16 and the reloaded model would no longer be the one that was trained. Tied parameters
    stay tied (each Parameter object is cast once, in place)."""
    for p in model.parameters():
        p.data = p.data.to(dtype)
    return model


def pick_device(name="auto"):
    """The device, chosen once: CUDA when present, else CPU; --device overrides."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return name


# ----------------------------------------------------------------------------------------------------------------
# greedy decoding and per-sequence scores

@torch.no_grad()
def greedy(model, prompts, max_new):
    """Greedy continuations (lists of ids) of prompts (lists of ids), max_new[i] tokens for prompt i, all decoded
    together in lock-step with a KV cache: one forward pass per position t for every sequence at once, which is
    fed its own prompt token while t is inside its prompt and its previous argmax after. The GPT has no padding
    mask, so prompts of unequal length cannot be left-padded into one batch; lock-step needs no padding, and makes
    max(length) forward passes instead of one per position per prompt length. The cache is the model's own
    (model.new_cache()), so a wrapped Hugging Face model (pretrained.py) decodes the same way."""
    dev = next(model.parameters()).device
    n, k = torch.tensor([len(p) for p in prompts]), torch.tensor(max_new)
    x = torch.zeros(len(prompts), int((n + k).max()), dtype=torch.long)
    for row, p in zip(x, prompts):
        row[:len(p)] = torch.tensor(p)
    x, n, caches, t0 = x.to(dev), n.to(dev), model.new_cache(), int(n.min())
    logits, _ = model(x[:, :t0], caches=caches)  # the part every prompt has
    for t in range(t0, x.size(1)):
        x[:, t] = torch.where(t < n, x[:, t], logits[:, -1].argmax(-1))
        if t + 1 < x.size(1):
            logits, _ = model(x[:, t:t + 1], caches=caches, pos0=t)
    return [row[a:a + b] for row, a, b in zip(x.tolist(), n.tolist(), k.tolist())]


@torch.no_grad()
def score(model, seqs, batch_size=128):
    """Per-sequence scores of a Seqs, from teacher-forced passes (no generation):
      ma       memorization accuracy: share of positions t in [1, length) where argmax p(.|x_<t) == x_t
               (Tirumala et al. 2022; Barbulescu & Triantafillou 2024)
      exact    greedy decoding from the prefix reproduces x[prefix:length] exactly. Greedy decoding copies a
               continuation iff every teacher-forced argmax over it is right, so this needs no generation.
      logprob  log π(x): the sum of log p(x_t | x_<t) over the real tokens after the first
      token_logprobs (N, T-1), 0 on padding, with token_mask (N, T-1) marking the real positions"""
    dev = next(model.parameters()).device
    out = {k: [] for k in ("ma", "exact", "logprob", "token_logprobs")}
    for i in range(0, len(seqs), batch_size):
        x = seqs.x[i:i + batch_size].to(dev)
        n, p = seqs.length[i:i + batch_size].to(dev), seqs.prefix[i:i + batch_size].to(dev)
        logits, _ = model(x[:, :-1])
        logp = F.log_softmax(logits.float(), dim=-1).gather(-1, x[:, 1:, None]).squeeze(-1)  # (B, T-1)
        t = torch.arange(1, x.size(1), device=dev)  # position of each predicted token
        real, cont = t < n[:, None], (t >= p[:, None]) & (t < n[:, None])
        hit = logits.argmax(-1) == x[:, 1:]
        out["ma"].append((hit & real).sum(1) / real.sum(1))
        out["exact"].append((hit | ~cont).all(1))
        out["logprob"].append((logp * real).sum(1))
        out["token_logprobs"].append(logp * real)
    out = {k: torch.cat(v).cpu() for k, v in out.items()}
    out["token_mask"] = seqs.mask[:, 1:]
    return out


def summarize(data, scores, by_kind=False):
    """{split}_exact and {split}_ma (means over sequences) from {split: score(...)}; with by_kind, the same per kind
    of text, and the secrets per repetition count (reps of the forget/retain copy; holdout has none)."""
    res, kinds = {}, {}
    for split, s in scores.items():
        seqs = data.split(split)
        res[f"{split}_exact"], res[f"{split}_ma"] = s["exact"].float().mean().item(), s["ma"].mean().item()
        for kind in dict.fromkeys(seqs.kind):
            sel = torch.tensor([k == kind for k in seqs.kind])
            d = kinds.setdefault(kind, {})
            d[f"{split}_exact"], d[f"{split}_ma"] = s["exact"][sel].float().mean().item(), s["ma"][sel].mean().item()
            if kind == "secrets" and split != "holdout":
                d[f"{split}_ma_by_reps"] = {int(r): s["ma"][sel & (seqs.reps == r)].mean().item()
                                            for r in seqs.reps[sel].unique()}
    if by_kind:
        res["by_kind"] = kinds
    return res


def memorization(model, data, splits=("forget", "retain", "holdout"), by_kind=False):
    """summarize() of one score() pass per split."""
    return summarize(data, {s: score(model, data.split(s)) for s in splits}, by_kind)


def logits_of(model, x):
    """The logits (B, T, V) of our GPT or of a Hugging Face causal LM."""
    out = model(x)
    return out[0] if isinstance(out, tuple) else out.logits


@torch.no_grad()
def perplexity(model, stream, T=None, batch_size=32):
    """exp(mean next-token cross-entropy) over non-overlapping windows of T input tokens of a token stream (T =
    the GPT's block_size: the positions training feeds). Works for Hugging Face causal LMs too."""
    T, dev = T or model.config.block_size, next(model.parameters()).device
    x = stream[: (len(stream) - 1) // T * T + 1]
    xs, ys = x[:-1].view(-1, T), x[1:].view(-1, T)
    nll = sum(F.cross_entropy(logits_of(model, a.to(dev)).float().flatten(0, 1), b.to(dev).flatten(), reduction="sum")
              for a, b in zip(xs.split(batch_size), ys.split(batch_size)))
    return math.exp(nll.item() / ys.numel())


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: one plain dict, loadable with weights_only=True, written atomically

def atomic_write_bytes(path, data):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


DIGESTS = {}  # (path, size, mtime) -> digest: each version of a file is hashed once per process


def digest(path):
    """A short hash of a file's bytes (None if it is missing): what the study's caches are keyed on."""
    path = Path(path)
    if not path.exists():
        return None
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in DIGESTS:
        DIGESTS[key] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return DIGESTS[key]


def write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


def save_checkpoint(path, model, **meta):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "model_args": asdict(model.config), **meta}, buf)
    atomic_write_bytes(path, buf.getvalue())


def from_args(model_args):
    """The model a checkpoint's model_args describe: our GPT, or, when they name a Hugging Face directory, that model
    wrapped by pretrained.py (imported only then: this file imports nothing else from the repository)."""
    if "hf_dir" in model_args:
        import pretrained
        return pretrained.HFCausalLM.from_args(model_args)
    return GPT(GPTConfig(**model_args))


def load_checkpoint(path, device="cpu"):
    """(model, checkpoint dict). A missing, truncated or foreign file is an error that names it."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path}: no such checkpoint. `python model.py` makes base/target/retrain; "
                         f"`python unlearn_*.py` the unlearned ones.")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        if "quant" in ckpt:
            raise SystemExit(f"{path} is a quantized checkpoint: load it with quantize.load_quantized")
        model = from_args(ckpt["model_args"])
        model.load_state_dict(ckpt["model"])
    except SystemExit:
        raise
    except Exception as e:  # torch and pickle raise many kinds for a bad file; all of them mean the same here
        raise SystemExit(f"{path}: not a nanoUnlearn checkpoint, or a damaged one ({type(e).__name__}: "
                         f"{str(e)[:200]}); give the path of a model that model.py or an unlearning script wrote, "
                         f"or rerun the command that makes it") from None
    dtype = next(iter(ckpt["model"].values())).dtype
    return to_dtype(model.to(device), dtype).eval(), ckpt


if __name__ == "__main__":  # the training program is train.py; `python model.py` is its command
    import train
    train.main()
