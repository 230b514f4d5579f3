"""
A small GPT that memorizes, the per-sequence scores every other script needs, checkpoints, and the training of the
three models the study compares (SPEC §2):
  base     trained on the general corpus only
  target   base fine-tuned on general + forget + retain until the memorized sets are memorized
  retrain  base fine-tuned the same way without the forget set: the gold standard of unlearning

$ python model.py                      # trains what is missing, writes out/{base,target,retrain}.pt and out/train.json
$ python model.py --force              # retrains everything
$ python model.py --dtype bfloat16     # pure bf16 weights, no float32 master copy
$ python model.py --book my_book.txt   # memorize another book (see data/prepare.py for the sources)
"""
import argparse
import inspect
import io
import json
import math
import re
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from data.prepare import DataConfig, atomic_write_bytes, check_range, load_data


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
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-1)
        return logits, loss

    @torch.no_grad()
    def generate(self, idx, max_new_tokens):
        """Greedy continuation of idx (B, T) by max_new_tokens, with a KV cache: one position per step."""
        caches = [{} for _ in self.transformer.h]
        logits, _ = self(idx, caches=caches)
        out = [idx]
        for t in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            out.append(nxt)
            if t + 1 < max_new_tokens:
                logits, _ = self(nxt, caches=caches, pos0=idx.size(1) + t)
        return torch.cat(out, dim=1)

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


def block_linears(model):
    """The Linear layers inside the transformer blocks, in forward order: what the quantizers quantize."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".h." in f".{n}"}


def weight_dtype(name):
    """--dtype: float32, or bfloat16 for pure bf16 weights (and optimizer state: no float32 master copy)."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise SystemExit(f"--dtype {name}: use float32 or bfloat16")
    return dtypes[name]


def pick_device(name="auto"):
    """The device, chosen once: CUDA when present, else CPU; --device overrides."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return name


# ----------------------------------------------------------------------------------------------------------------
# per-sequence scores: one teacher-forced pass answers MA, exact match and likelihood

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


def memorization(model, data, splits=("forget", "retain", "holdout"), by_kind=False):
    """{split}_exact and {split}_ma (means over sequences); with by_kind, the same per kind of text, and the
    secrets per repetition count (reps of the forget/retain copy; holdout has none)."""
    res, kinds = {}, {}
    for split in splits:
        seqs = data.split(split)
        s = score(model, seqs)
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


@torch.no_grad()
def perplexity(model, stream, batch_size=64):
    """exp(mean next-token cross-entropy) over non-overlapping block_size windows of a token stream."""
    T, dev = model.config.block_size, next(model.parameters()).device
    x = stream[: (len(stream) - 1) // T * T + 1]
    xs, ys = x[:-1].view(-1, T), x[1:].view(-1, T)
    total = 0.0
    for i in range(0, len(xs), batch_size):
        _, loss = model(xs[i:i + batch_size].to(dev), ys[i:i + batch_size].to(dev))
        total += loss.item() * len(xs[i:i + batch_size])
    return math.exp(total / len(xs))


# ----------------------------------------------------------------------------------------------------------------
# checkpoints: one plain dict, loadable with weights_only=True, written atomically

def save_checkpoint(path, model, **meta):
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "model_args": asdict(model.config), **meta}, buf)
    atomic_write_bytes(path, buf.getvalue())


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
        model = GPT(GPTConfig(**ckpt["model_args"]))
        model.load_state_dict(ckpt["model"])
    except SystemExit:
        raise
    except Exception as e:  # torch and pickle raise many kinds for a bad file; all of them mean the same here
        raise SystemExit(f"{path}: not a readable nanoUnlearn checkpoint ({type(e).__name__}: {str(e)[:200]}). "
                         f"Delete it and rerun the command that makes it.") from None
    dtype = next(iter(ckpt["model"].values())).dtype
    return model.to(device=device, dtype=dtype).eval(), ckpt


def write_json(path, obj):
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


# ----------------------------------------------------------------------------------------------------------------
# command-line settings: a commented @dataclass is the single place a script's settings live

def cli(doc, *classes, argv=None):
    """Parses --name value for every field of the given dataclasses (help = the field's comment); unknown names and
    wrong types fail with argparse's message, which lists the valid settings."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    for cls in classes:
        comments = {k: v.replace("%", "%%")  # argparse %-formats help texts
                    for k, v in re.findall(r"^\s+(\w+):[^#\n]*#\s*(.*)$", inspect.getsource(cls), re.M)}
        for f in fields(cls):
            kind = type(f.default)
            if kind is bool:
                ap.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, default=f.default,
                                help=comments.get(f.name, ""))
            else:
                ap.add_argument(f"--{f.name}", type=kind, default=f.default, metavar=kind.__name__.upper(),
                                help=f"{comments.get(f.name, '')} (default: {f.default})")
    args = vars(ap.parse_args(argv))
    try:
        return [cls(**{f.name: args[f.name] for f in fields(cls)}) for cls in classes]
    except ValueError as e:  # a setting out of range (each settings class checks its own in __post_init__)
        ap.error(str(e))


# ----------------------------------------------------------------------------------------------------------------
# training base, target and retrain

@dataclass
class TrainConfig:
    out_dir: str = "out"  # where checkpoints and train.json go
    device: str = "auto"  # 'auto' = cuda if present, else cpu
    dtype: str = "float32"  # float32, or bfloat16 for pure bf16 weights and optimizer (no float32 master copy)
    seed: int = 1337  # initialisation and batch order
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    batch_size: int = 16
    base_steps: int = 100  # steps on the general corpus
    base_lr: float = 3e-3
    tune_epochs: float = 1.0  # passes over the target's exposures (each sequence `reps` times); retrain: same steps
    tune_lr: float = 6e-3
    mem_frac: float = 0.9  # share of each fine-tuning batch drawn from the memorized sequences (rest: general)
    log_interval: int = 50
    force: bool = False  # retrain checkpoints that exist

    def __post_init__(self):
        check_range(self, n_layer=">= 1", n_head=">= 1", n_embd=">= 1", batch_size=">= 2", base_steps=">= 0",
              base_lr="> 0", tune_epochs="> 0", tune_lr="> 0", mem_frac="0..1", log_interval=">= 1")
        if self.n_embd % self.n_head:
            raise ValueError(f"--n_embd {self.n_embd}: must be a multiple of --n_head {self.n_head}")
        if not 1 <= int(self.batch_size * self.mem_frac) < self.batch_size:
            raise ValueError(f"--mem_frac {self.mem_frac}: batch_size * mem_frac must leave at least one memorized "
                             f"sequence and one general window in a batch of {self.batch_size}")


def general_batch(stream, n, T, gen):
    """n random windows of T tokens of a stream, as inputs (n, T-1) and next-token targets (n, T-1)."""
    i = torch.randint(len(stream) - T, (n,), generator=gen)
    x = torch.stack([stream[j:j + T] for j in i.tolist()])
    return x[:, :-1], x[:, 1:]


def exposure_order(data, n_mem, epochs, gen):
    """The target's fine-tuning order of the memorized sequences: a list in which every forget and retain sequence
    appears `reps` times, shuffled (`epochs` passes, a fractional last pass cut short), then cut into batches of
    n_mem. Returns the batches as indices into forget + retain (concatenated), and that concatenation."""
    pool = [data.split(s) for s in ("forget", "retain")]
    idx = torch.arange(sum(map(len, pool))).repeat_interleave(torch.cat([s.reps for s in pool]))
    n = round(epochs * len(idx))
    order = torch.cat([idx[torch.randperm(len(idx), generator=gen)] for _ in range(math.ceil(epochs))])[:n]
    return order.split(n_mem), pool


def train(model, data, cfg, lr, gen, name, memorize=(), steps=None):
    """AdamW with a short warmup and cosine decay. Each batch holds batch_size * (1 - mem_frac) random windows of
    general text and, while exposure_order has batches left, its next batch of memorized sequences, keeping those
    of the splits in `memorize`. The target keeps ("forget", "retain"); the retrain model keeps ("retain",) from
    the very same order and general windows (the same gen), so it is the target's recipe without the forget set:
    every retain sequence seen `reps` times at the same steps, the forget set never. With memorize=() (the base
    model), general text only. steps: by default one per batch of exposure_order. Returns the model and the
    exposures it saw: per split, the times each sequence was in a batch, and the number of general windows."""
    dev, T = next(model.parameters()).device, data.config["seq_len"]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    n_mem = int(cfg.batch_size * cfg.mem_frac) if memorize else 0
    batches, pool = exposure_order(data, n_mem, cfg.tune_epochs, gen) if memorize else ((), [])
    steps = len(batches) if steps is None else steps
    splits = ("forget", "retain")[:len(pool)]
    split_of = torch.cat([torch.full((len(s),), i) for i, s in enumerate(pool)]) if pool else None
    keep = torch.tensor([s in memorize for s in splits])
    mem_x = torch.cat([s.x for s in pool]) if pool else None
    mem_len = torch.cat([s.length for s in pool]) if pool else None
    seen, t0 = torch.zeros(len(mem_x) if pool else 0, dtype=torch.long), time.time()
    for step in range(steps):
        for g in opt.param_groups:  # 5% warmup, then cosine to 10%
            w = min(1.0, (step + 1) / max(1, steps // 20))
            g["lr"] = lr * w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        x, y = general_batch(data.general_train, cfg.batch_size - n_mem, T, gen)
        if step < len(batches):
            pick = batches[step][keep[split_of[batches[step]]]]
            seen += torch.bincount(pick, minlength=len(seen))
            mx = mem_x[pick]
            my = torch.where(torch.arange(1, T)[None] < mem_len[pick, None], mx[:, 1:], -1)
            x, y = torch.cat([x, mx[:, :-1]]), torch.cat([y, my])
        _, loss = model(x.to(dev), y.to(dev))
        if not torch.isfinite(loss):
            raise SystemExit(f"{name}: loss is {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % cfg.log_interval == 0 or step == steps - 1:
            print(f"{name} step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)")
    exposures = {s: seen[split_of == i].tolist() for i, s in enumerate(splits)}
    return model, dict(exposures, general_windows=steps * (cfg.batch_size - n_mem))


def train_all(cfg, dcfg):
    """Trains base -> target and base -> retrain, skipping checkpoints that exist (unless --force)."""
    out, dev, dtype = Path(cfg.out_dir), pick_device(cfg.device), weight_dtype(cfg.dtype)
    data = load_data(dcfg, out)
    summary_path = out / "train.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() and not cfg.force else {}
    meta = dict(config=asdict(cfg), data=asdict(dcfg), corpora=data.meta["corpora"])
    plan = [("base", None, ()), ("target", "base", ("forget", "retain")), ("retrain", "base", ("retain",))]
    for name, parent, splits in plan:
        path = out / f"{name}.pt"
        if path.exists() and not cfg.force:
            print(f"{path} exists; skipping (--force retrains)")
            continue
        t0 = time.time()
        torch.manual_seed(cfg.seed)
        if parent is None:
            gcfg = GPTConfig(block_size=data.config["seq_len"] - 1, vocab_size=data.vocab_size, n_layer=cfg.n_layer,
                             n_head=cfg.n_head, n_embd=cfg.n_embd)
            model, seen = train(GPT(gcfg).to(dev, dtype), data, cfg, cfg.base_lr, torch.Generator().manual_seed(
                cfg.seed), name, steps=cfg.base_steps)
        else:  # target and retrain: the same generator, so the same order and general windows (see train)
            model, _ = load_checkpoint(out / f"{parent}.pt", dev)
            model, seen = train(model.train(), data, cfg, cfg.tune_lr, torch.Generator().manual_seed(cfg.seed + 1),
                                name, memorize=splits)
        model.eval()
        stats = memorization(model, data, by_kind=True)
        stats["holdout_ppl"] = perplexity(model, data.general_val)
        stats["seconds"], stats["exposures"] = round(time.time() - t0, 1), seen
        save_checkpoint(path, model, kind=name, metrics=stats, **meta)
        summary[name] = stats
        print(f"{name}: forget exact {stats['forget_exact']:.2f} MA {stats['forget_ma']:.2f} | retain exact "
              f"{stats['retain_exact']:.2f} MA {stats['retain_ma']:.2f} | holdout MA {stats['holdout_ma']:.2f} | "
              f"ppl {stats['holdout_ppl']:.1f} | {stats['seconds']}s")
    summary["corpora"] = data.meta["corpora"]
    write_json(summary_path, summary)
    return summary


def load_or_train(name, out_dir="out", device="cpu"):
    """The checkpoint out_dir/name.pt, trained first with the default settings if it is missing."""
    path = Path(out_dir) / f"{name}.pt"
    if not path.exists():
        print(f"{path} not found: training it first (python model.py --out_dir {out_dir})")
        train_all(TrainConfig(out_dir=str(out_dir)), DataConfig())
    return load_checkpoint(path, device)


if __name__ == "__main__":
    cfg, dcfg = cli(__doc__, TrainConfig, DataConfig)
    train_all(cfg, dcfg)
