"""
The durability card: does the unlearning survive quantization and relearning? (RESULTS.md, section 3)

Quantization is one way to get "forgotten" text back; a few steps of fine-tuning are the other (relearning attacks,
Hu et al. 2024, "Jogging the Memory of Unlearned LLMs Through Targeted Relearning Attacks"). Three attacks on every
model of the study (target and retrain are the controls: retrain shows how fast text a model never saw is learned
from scratch, the floor an attack must beat):
  forget_half   fine-tune on one half of the forget set (the attacker holds part of what was forgotten)
  retain        fine-tune on the retain set (related text the model kept)
  general       fine-tune on general text (any text at all)
Each attack fine-tunes a copy of the model with AdamW (CE, constant lr, gradient clipped to 1.0) for k steps, k on a
log scale up to one epoch of the attack (every sequence of its pool once, shuffled; `attack_epoch`), and measures the
other half of the forget set, which no attack trains on, after each k: VerbMem, exact match, MA.

Robustness scores of the UDS study (Lee, Kim & Jo 2026, "Measuring the Depth of LLM Unlearning via Activation
Patching", arXiv 2605.24614), for a forget metric m:
  Q = 1 - |m_after - m_before| / (|m_before| + |m_after|)    after 4-bit quantization: against the model itself
  R = 1 - |Δ - Δ_ret| / (|Δ| + |Δ_ret|), Δ = m_after - m_before   after one epoch of relearning: against the
      retrain model's Δ_ret under the same attack, since relearning teaches any model something, and unlearning is
      durable when the model relearns as a model that never saw the forget set does
Both are 1 when the metric moves as its control does (Q: not at all), 0 when only one of the two moves or they move
in opposite directions.

$ python evaluate.py --durability                  # the study, then the card: out/durability.json, .csv, figure 7
$ python evaluate.py --durability --seeds 1337,1338,1339   # the card over three seeds, mean ± sd
"""
import copy
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import metrics
import model as M
from data.prepare import DataConfig, load_data
from settings import check_range, digest, environment, write_json
from train import adamw, bf16_arithmetic, bf16_native
from unlearn import ce_loss

ATTACKS = ("forget_half", "retain", "general")
METRICS = ("verbmem_forget", "forget_exact", "forget_ma")  # measured on the half of D_f no attack trains on


@dataclass
class RelearnConfig:
    relearn_lr: float = 3e-4  # AdamW, constant: the unlearning scripts' default learning rate
    relearn_batch: int = 8  # sequences (or general windows) per relearning step

    def __post_init__(self):
        check_range(self, relearn_lr="> 0", relearn_batch=">= 1")


def robustness(before, after):
    """Q of the UDS study (arXiv 2605.24614), of a forget metric before and after quantization:
        Q = 1 - |after - before| / (|before| + |after|)
    1 when both are 0 (nothing moved)."""
    total = abs(before) + abs(after)
    return 1.0 if total == 0 else 1 - abs(after - before) / total


def relearn_robustness(delta, delta_retrain):
    """R of the UDS study (arXiv 2605.24614; in its code, compute_r of runs/meta_eval/robustness/relearn/plots/
    plot_relearn_symmetric.py): does an attack move a model's forget metric as it moves the retrain model's?
        R = 1 - |Δ - Δ_ret| / (|Δ| + |Δ_ret|),  Δ = m_after - m_before of the model, Δ_ret of retrain, same attack
    1 when the two move alike, and when neither moves (nothing moved differently; the study's eps gives the same), so
    the retrain model's own R is 1 by construction. 0 when only one moves or they move in opposite directions, however
    little: read R beside the deltas. E.g. retrain 44 -> 42 (Δ_ret = -2), a method 52 -> 76 (Δ = +24): R = 0."""
    total = abs(delta) + abs(delta_retrain)
    return 1.0 if total == 0 else 1 - abs(delta - delta_retrain) / total


def halves(data, seed):
    """The forget set cut in two at random (seeded): (attack half, measured half)."""
    forget = data.split("forget")
    order = torch.randperm(len(forget), generator=torch.Generator().manual_seed(seed))
    return forget.select(order[:len(forget) // 2]), forget.select(order[len(forget) // 2:])


def schedule(n_attack, batch):
    """k on a log scale, 0, 1, 2, 4, ..., up to one epoch of n_attack sequences: ceil(n_attack / batch) steps."""
    epoch = math.ceil(n_attack / batch)
    return sorted({0, epoch, *(2 ** i for i in range(epoch.bit_length()) if 2 ** i < epoch)})


def epoch_batches(n_pool, n, batch, gen):
    """The batches of indices of one epoch: n of a pool's n_pool items, each at most once, in a random order (gen),
    cut into ceil(n / batch) batches of `batch`, the last one smaller when batch does not divide n. With n = n_pool,
    every item exactly once."""
    if n > n_pool:
        raise ValueError(f"an epoch of {n} items from a pool of {n_pool}")
    return list(torch.randperm(n_pool, generator=gen)[:n].split(batch))


def epoch_size(attack, data, attack_half):
    """The sequences in one epoch of an attack: its pool's, the attack half or the retain set. General text has no
    epoch of its own (the corpus is many times D_f), so its epoch is as many windows as the attack half has sequences:
    the forget-half attack's steps and sequences, on unrelated text."""
    return len(data.split("retain")) if attack == "retain" else len(attack_half)


def attack_epoch(attack, data, attack_half, batch, gen):
    """One epoch of an attack, a loss function of the model for each of its ceil(epoch_size / batch) steps: every
    sequence of the pool once, shuffled; for general text, non-overlapping seq_len-token windows of the general
    corpus, drawn without replacement."""
    n = epoch_size(attack, data, attack_half)
    if attack == "general":
        T = data.config["seq_len"]
        windows = data.general_train[:len(data.general_train) // T * T].view(-1, T)  # (n_windows, T), non-overlapping
        return [window_loss(windows[i]) for i in epoch_batches(len(windows), n, batch, gen)]
    pool = attack_half if attack == "forget_half" else data.split("retain")
    return [seqs_loss(pool.select(i)) for i in epoch_batches(len(pool), n, batch, gen)]


def seqs_loss(seqs):
    """The CE of memorized sequences (unlearn.ce_loss: the real tokens only)."""
    return lambda m: ce_loss(m, seqs)


def window_loss(x):
    """The next-token CE of general-text windows x (B, T): no padding, every position is a target."""
    return lambda m: m(x[:, :-1].to(next(m.parameters()).device), x[:, 1:].to(next(m.parameters()).device))[1]


def measure_half(model, data, seqs):
    """The forget metrics on the measured half."""
    s = M.score(model, seqs)
    return dict(verbmem_forget=metrics.verbmem(model, seqs, data.decode), forget_exact=s["exact"].float().mean().item(),
                forget_ma=s["ma"].mean().item())


def relearn(model, data, attack, cfg, seed, dtype=torch.float32):
    """One attack on a copy of the model, its weights stored in dtype (train.adamw; bf16 arithmetic in
    train.bf16_arithmetic, which relearn_model enters): {k: the metrics of the measured half after k steps} for k in
    schedule."""
    attack_half, measured = halves(data, seed)
    ks = schedule(epoch_size(attack, data, attack_half), cfg.relearn_batch)
    steps = attack_epoch(attack, data, attack_half, cfg.relearn_batch, torch.Generator().manual_seed(seed))
    m = copy.deepcopy(model).train()
    opt = adamw(m.parameters(), dtype, lr=cfg.relearn_lr, weight_decay=0.0)
    curve = {0: measure_half(m.eval(), data, measured)}
    for step, loss_of in enumerate(steps, 1):
        loss = loss_of(m.train())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if step in ks:
            curve[step] = measure_half(m.eval(), data, measured)
    return curve


def relearn_model(cfg, rcfg, name):
    """A job of the study (evaluate.py --durability): every attack on out_dir/<name>.pt, in the study's dtype and
    seed; {attack: curve}. Cached in out_dir/relearn/<name>.json under the hash of the checkpoint, the settings and
    the environment (settings.environment)."""
    out, dev = Path(cfg.out_dir), M.pick_device(cfg.device)
    key = dict(model=digest(out / f"{name}.pt"), settings=asdict(rcfg), seed=cfg.seed, dtype=cfg.dtype,
               environment=environment(dev, cfg.base, torch.get_num_threads(),
                                       bf16_native(dev) if cfg.dtype == "bfloat16" else None))
    path = out / "relearn" / f"{name}.json"
    if path.exists() and not cfg.force:
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            return cached["curves"]
    t = time.time()
    model, ckpt = M.load_checkpoint(out / f"{name}.pt", dev)
    data = load_data(DataConfig(**ckpt["data"]), out)
    dtype = M.weight_dtype(cfg.dtype)
    model = M.to_dtype(model, dtype)
    with bf16_arithmetic(model):
        curves = {a: relearn(model, data, a, rcfg, cfg.seed, dtype) for a in ATTACKS}
    write_json(path, dict(key=key, curves=curves, seconds=round(time.time() - t, 2)))
    return json.loads(path.read_text())["curves"]  # as read back: k as a string, the same as from the cache


def card(rows, curves, quantizers):
    """The durability card per model: forget VerbMem at full precision; Q of forget VerbMem for each quantizer
    (the study's rows, on the whole forget set); for each attack, forget VerbMem of the measured half before and after
    one epoch, and R against the retrain model's change under that attack. The retrain model's R is 1 by
    construction; the target, which never unlearned, is scored like a method: the R of not unlearning at all.
    Q's before/after form is not kept for relearning: it ignores the control, so a model that relearns exactly as
    retrain does scores below 1, and the before and after columns already show how far the metric moved."""
    by = {(r["model"], r["precision"]): r for r in rows}

    def ends(curve):  # forget VerbMem at k = 0 and after one epoch
        ks = sorted(curve, key=int)
        return curve[ks[0]]["verbmem_forget"], curve[ks[-1]]["verbmem_forget"]
    out = {}
    for name, attacks in curves.items():
        fp = by[name, "full"]["verbmem_forget"]
        row = dict(verbmem_full=fp)
        for p in quantizers:
            row[f"verbmem_{p}"] = by[name, p]["verbmem_forget"]
            row[f"Q_{p}"] = robustness(fp, row[f"verbmem_{p}"])
        for a, curve in attacks.items():
            (before, after), (ret_before, ret_after) = ends(curve), ends(curves["retrain"][a])
            row.update({f"verbmem_{a}_before": before, f"verbmem_{a}_after": after,
                        f"R_{a}": relearn_robustness(after - before, ret_after - ret_before)})
        out[name] = row
    return out
