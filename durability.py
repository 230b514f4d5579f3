"""
The durability card: does the unlearning survive quantization and relearning? (README, "Durability")

Quantization is one way to get "forgotten" text back; a few steps of fine-tuning are the other (relearning attacks,
Hu et al. 2024, "Jogging the Memory of Unlearned LLMs Through Targeted Relearning Attacks"). Three attacks on every
model of the study (target and retrain are the controls: retrain shows how fast text a model never saw is learned
from scratch, the floor an attack must beat):
  forget_half   fine-tune on one half of the forget set (the attacker holds part of what was forgotten)
  retain        fine-tune on the retain set (related text the model kept)
  general       fine-tune on general text (any text at all)
Each attack fine-tunes a copy of the model with AdamW (CE, constant lr, gradient clipped to 1.0) for k steps, k on a
log scale up to one epoch of the attack's forget half, and measures the other half of the forget set, which no attack
trains on, after each k: VerbMem, exact match, MA.

Robustness scores in the UDS study's form (arXiv 2605.24614), for a forget metric m measured before and after:
  Q = 1 - |m_after - m_before| / (|m_before| + |m_after|)   after 4-bit quantization
  R = the same                                              after one epoch of relearning
1 when the metric does not move, 0 when one side is 0 and the other is not.

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
from settings import check_range
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
    """Q or R of the UDS study: 1 - |after - before| / (|before| + |after|); 1 when both are 0 (nothing moved)."""
    total = abs(before) + abs(after)
    return 1.0 if total == 0 else 1 - abs(after - before) / total


def halves(data, seed):
    """The forget set cut in two at random (seeded): (attack half, measured half)."""
    forget = data.split("forget")
    order = torch.randperm(len(forget), generator=torch.Generator().manual_seed(seed))
    return forget.select(order[:len(forget) // 2]), forget.select(order[len(forget) // 2:])


def schedule(n_attack, batch):
    """k on a log scale, 0, 1, 2, 4, ..., up to one epoch of the attack half: ceil(n_attack / batch) steps."""
    epoch = math.ceil(n_attack / batch)
    return sorted({0, epoch, *(2 ** i for i in range(epoch.bit_length()) if 2 ** i < epoch)})


def attack_batch(attack, data, attack_half, batch, T, gen):
    """One relearning batch of an attack: a loss function of the model."""
    if attack == "general":
        i = torch.randint(len(data.general_train) - T, (batch,), generator=gen)
        x = torch.stack([data.general_train[j:j + T] for j in i.tolist()])
        return lambda m: m(x[:, :-1].to(next(m.parameters()).device), x[:, 1:].to(next(m.parameters()).device))[1]
    pool = attack_half if attack == "forget_half" else data.split("retain")
    seqs = pool.select(torch.randperm(len(pool), generator=gen)[:batch])
    return lambda m: ce_loss(m, seqs)


def measure_half(model, data, seqs):
    """The forget metrics on the measured half."""
    s = M.score(model, seqs)
    return dict(verbmem_forget=metrics.verbmem(model, seqs, data.decode), forget_exact=s["exact"].float().mean().item(),
                forget_ma=s["ma"].mean().item())


def relearn(model, data, attack, cfg, seed):
    """One attack on a copy of the model: {k: the metrics of the measured half after k steps} for k in schedule."""
    attack_half, measured = halves(data, seed)
    ks = schedule(len(attack_half), cfg.relearn_batch)
    m, gen = copy.deepcopy(model).train(), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(m.parameters(), lr=cfg.relearn_lr, weight_decay=0.0)
    curve = {0: measure_half(m.eval(), data, measured)}
    for step in range(1, ks[-1] + 1):
        loss = attack_batch(attack, data, attack_half, cfg.relearn_batch, data.config["seq_len"], gen)(m.train())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        if step in ks:
            curve[step] = measure_half(m.eval(), data, measured)
    return curve


def relearn_model(cfg, rcfg, name):
    """A job of the study (evaluate.py --durability): every attack on out_dir/<name>.pt, in the study's dtype and
    seed; {attack: curve}. Cached in out_dir/relearn/<name>.json under the hash of the checkpoint and the
    settings."""
    out = Path(cfg.out_dir)
    key = dict(model=M.digest(out / f"{name}.pt"), settings=asdict(rcfg), seed=cfg.seed, dtype=cfg.dtype)
    path = out / "relearn" / f"{name}.json"
    if path.exists() and not cfg.force:
        cached = json.loads(path.read_text())
        if cached["key"] == key:
            return cached["curves"]
    t, dev = time.time(), M.pick_device(cfg.device)
    model, ckpt = M.load_checkpoint(out / f"{name}.pt", dev)
    data = load_data(DataConfig(**ckpt["data"]), out)
    curves = {a: relearn(model.to(M.weight_dtype(cfg.dtype)), data, a, rcfg, cfg.seed) for a in ATTACKS}
    M.write_json(path, dict(key=key, curves=curves, seconds=round(time.time() - t, 2)))
    return json.loads(path.read_text())["curves"]  # as read back: k as a string, the same as from the cache


def card(rows, curves, quantizers):
    """The durability card per model: forget VerbMem at full precision; Q of forget VerbMem for each quantizer
    (the study's rows, on the whole forget set); R of forget VerbMem for each attack after one epoch (the measured
    half), with the metric before and after."""
    by = {(r["model"], r["precision"]): r for r in rows}
    out = {}
    for name, attacks in curves.items():
        fp = by[name, "fp32"]["verbmem_forget"]
        row = dict(verbmem_fp32=fp)
        for p in quantizers:
            row[f"verbmem_{p}"] = by[name, p]["verbmem_forget"]
            row[f"Q_{p}"] = robustness(fp, row[f"verbmem_{p}"])
        for a, curve in attacks.items():
            ks = sorted(curve, key=int)
            before, after = curve[ks[0]]["verbmem_forget"], curve[ks[-1]]["verbmem_forget"]
            row.update({f"verbmem_{a}_before": before, f"verbmem_{a}_after": after, f"R_{a}": robustness(before, after)})
        out[name] = row
    return out
