"""
A small GPT that memorizes, a Hugging Face causal LM behind the same interface, and what every other script asks of
them: greedy decoding, per-sequence scores from one teacher-forced pass (memorization accuracy, exact match,
log-likelihood), perplexity, the dtype and device, and loading a checkpoint.

nanoGPT's model (GPT-2's module names, so Hugging Face GPT-2 weights load), trained by train.py into the three
models the study compares: base (general text), target (base fine-tuned on general + forget + retain until the
memorized sets are memorized) and retrain (the same without the forget set). This file imports nothing else from
the repository; `python train.py` trains.
"""
import inspect
import math
from dataclasses import dataclass
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


# ----------------------------------------------------------------------------------------------------------------
# a pretrained model: a Hugging Face causal LM with the GPT's interface, as nanoGPT's from_pretrained loads GPT-2
# (transformers is imported only on this path)

# Attention as the plain softmax(QKᵀ/√d)V in torch ops ("eager"), not torch's fused scaled_dot_product_attention: at
# the few dozen tokens the study's sequences have, the CPU kernel's backward pass costs more than the eager one.
ATTENTION = "eager"


@dataclass
class HFConfig:
    hf_dir: str  # the local Hugging Face directory the model comes from (its config.json and initial weights)
    block_size: int  # longest input, as the GPT's: the data's seq_len - 1, the positions fine-tuning feeds


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM that reads like GPT: forward(idx, targets, caches, pos0) -> (logits, loss) with
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
        return logits, lm_loss(logits, targets)

    @classmethod
    def from_args(cls, model_args):
        """The model a checkpoint's model_args describe (the checkpoint's state_dict then replaces its weights)."""
        cfg = HFConfig(**model_args)
        if not (Path(cfg.hf_dir) / "config.json").exists():
            raise SystemExit(f"the checkpoint's model comes from {cfg.hf_dir}, which is not there any more: put the "
                             f"Hugging Face model back there, or retrain (python train.py --force --base hf:DIR)")
        hf = auto_model().from_pretrained(cfg.hf_dir, local_files_only=True, dtype=torch.float32,
                                          attn_implementation=ATTENTION)
        return cls(hf, cfg)  # float32, so that loading a float32 state_dict into it loses nothing


def auto_model():
    """transformers' AutoModelForCausalLM, imported here only (the toy path never needs transformers), with its
    progress bars off: the study loads models again and again, and a bar each time is noise in its one-line log."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging
    logging.disable_progress_bar()
    return AutoModelForCausalLM


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
# checkpoints (written by settings.save_checkpoint)

def from_args(model_args):
    """The model a checkpoint's model_args describe: our GPT, or, when they name a Hugging Face directory, that model
    wrapped (HFCausalLM)."""
    if "hf_dir" in model_args:
        return HFCausalLM.from_args(model_args)
    return GPT(GPTConfig(**model_args))


def load_checkpoint(path, device="cpu"):
    """(model, checkpoint dict). A missing, truncated or foreign file is an error that names it."""
    path = Path(path)
    if not path.exists():
        raise SystemExit(f"{path}: no such checkpoint. `python train.py` makes base/target/retrain; "
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
                         f"{str(e)[:200]}); give the path of a model that train.py or an unlearning script wrote, "
                         f"or rerun the command that makes it") from None
    dtype = next(iter(ckpt["model"].values())).dtype
    return to_dtype(model.to(device), dtype).eval(), ckpt


if __name__ == "__main__":
    raise SystemExit("model.py is the model; `python train.py` trains base, target and retrain (README)")
