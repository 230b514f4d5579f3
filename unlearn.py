"""
The one loop every unlearning script shares, and what they all do around it (Zhang et al. 2024, arXiv 2410.16454,
section 3, for the utility-constrained objectives and SURE): load the target, minimize

    forget_loss(theta; batch of D_f) + alpha * retain_term(theta; batch of D_r)

with AdamW, measure the result, save it. Each method script (unlearn_ga.py, unlearn_npo.py, unlearn_memflex.py,
task_arithmetic.py) hands this loop its own forget loss; the retain terms (GDR, KLR) and SURE's saliency mask are
switches on it. METHODS lists the 14 methods and the command that makes each.
"""
import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from data.prepare import DataConfig, load_data
from model import block_linears, memorization, perplexity, pick_device, score, to_dtype, weight_dtype
from settings import check_range, save_checkpoint, write_json
from train import adamw, bf16_arithmetic, load_or_train

METHODS = {  # method (its checkpoint is out/<method>.pt) -> the command that makes it
    "ga": "unlearn_ga", "ga_gdr": "unlearn_ga --retain gdr", "ga_klr": "unlearn_ga --retain klr",
    "npo": "unlearn_npo", "npo_gdr": "unlearn_npo --retain gdr", "npo_klr": "unlearn_npo --retain klr",
    "ga_gdr_sure": "unlearn_ga --retain gdr --sure", "ga_klr_sure": "unlearn_ga --retain klr --sure",
    "npo_gdr_sure": "unlearn_npo --retain gdr --sure", "npo_klr_sure": "unlearn_npo --retain klr --sure",
    "sga": "unlearn_ga --selective", "ta": "task_arithmetic", "tau": "task_arithmetic --tau",
    "memflex": "unlearn_memflex"}


# ----------------------------------------------------------------------------------------------------------------
@dataclass
class UnlearnConfig:
    out_dir: str = "out"  # reads target.pt, writes <method>.pt and <method>.json
    device: str = "auto"  # 'auto' = cuda if present, else cpu
    dtype: str = "float32"  # float32, or bfloat16: pure bf16 weights and AdamW state, no float32 master copy
    seed: int = 1337  # batch order
    lr: float = 3e-4  # AdamW, constant, weight decay 0
    steps: int = 40  # optimizer steps (an upper bound where the method has its own stopping rule)
    batch_size: int = 8  # forget sequences per step, and as many retain sequences when a retain term is on
    log_interval: int = 10  # steps between log lines (each also measures MA on the whole forget set)

    def __post_init__(self):
        check_range(self, lr="> 0", steps=">= 0", batch_size=">= 1", log_interval=">= 1")


@dataclass
class RetainConfig:
    retain: str = "none"  # utility term: none | gdr (+alpha*CE on D_r) | klr (+alpha*KL(pi_ref||pi_theta) on D_r)
    alpha: float = 1.0  # weight of the retain term
    sure: bool = False  # SURE: move only the weight matrices with saliency >= the sure_gamma-th percentile, lr x10
    sure_gamma: float = 90.0  # percentile of the saliency (the paper uses 90 and 99)

    def __post_init__(self):
        check_range(self, alpha=">= 0", sure_gamma="0..100")


# ----------------------------------------------------------------------------------------------------------------


def xy(seqs, device):
    """Inputs (N, T-1) and next-token targets (N, T-1) of a Seqs; -1 on padding, which the loss ignores."""
    x = seqs.x.to(device)
    return x[:, :-1], torch.where(seqs.mask[:, 1:].to(device), x[:, 1:], -1)


def ce_loss(model, seqs):
    """CE: the mean token cross-entropy over the real tokens of the sequences."""
    return model(*xy(seqs, next(model.parameters()).device))[1]


def kl_loss(ref_logits, logits, mask):
    """KLR (Maini et al. 2024, TOFU): KL(pi_ref(.|x_<t) || pi_theta(.|x_<t)) = sum_v p_ref(v) (log p_ref(v) -
    log p_theta(v)), from the log-softmax of both models' logits (B, T, V), averaged over the positions where
    mask (B, T) is True. Never negative; exactly 0 when the logits are the reference's."""
    lp_ref, lp = F.log_softmax(ref_logits.float(), -1), F.log_softmax(logits.float(), -1)
    return (lp_ref.exp() * (lp_ref - lp)).sum(-1)[mask].mean()


def frozen(model):
    """pi_ref: a copy of the model that no optimizer can touch."""
    return copy.deepcopy(model).requires_grad_(False)


def retain_term(kind, model):
    """The utility term on a batch of D_r: None, GDR's CE, or KLR's KL to a frozen copy of the current weights."""
    if kind == "none":
        return None
    if kind == "gdr":
        return ce_loss
    if kind != "klr":
        raise ValueError(f"retain term {kind!r}: use none, gdr or klr")
    ref = frozen(model)

    def klr(m, seqs):
        x, y = xy(seqs, next(m.parameters()).device)
        return kl_loss(ref(x)[0], m(x)[0], y != -1)
    return klr


def block_grads(model, loss):
    """The gradient of a scalar loss for each weight matrix of the transformer blocks (name -> float32 tensor)."""
    model.zero_grad(set_to_none=True)
    loss.backward()
    g = {n: m.weight.grad.float() for n, m in block_linears(model).items()}
    model.zero_grad(set_to_none=True)
    return g


def saliency(model, seqs, forget_loss):
    """SURE (Zhang et al. 2024, arXiv 2410.16454): s_i = ||grad_{W_i} L_forget|| for each weight matrix W_i of the
    transformer blocks, at the current (target) weights, over the whole forget set."""
    return {n: g.norm().item() for n, g in block_grads(model, forget_loss(model, seqs)).items()}


def sure_mask(sal, gamma):
    """The names whose saliency is >= the gamma-th percentile (linear interpolation) of all of them."""
    if not 0 <= gamma <= 100:
        raise ValueError(f"sure_gamma is a percentile in [0, 100]; got {gamma}")
    q = torch.quantile(torch.tensor(list(sal.values()), dtype=torch.float64), gamma / 100).item()
    return {n for n, s in sal.items() if s >= q}


def unlearn(model, data, forget_loss, cfg, rcfg=RetainConfig(), mask=None, pick=None):
    """Minimizes forget_loss(model, batch of D_f) + alpha * retain term(model, batch of D_r) with AdamW (constant lr,
    no weight decay, gradient norm clipped to 1.0). Only the block weight matrices named in `mask` are trained when
    it is given (or when rcfg.sure computes one, then with lr x10); every other parameter is frozen, not merely
    given a zero gradient, so it stays bit-identical. pick(model, forget) -> indices to draw the step's batch from,
    or None to stop. Returns (model, stats); a NaN/inf loss stops the run."""
    with bf16_arithmetic(model):
        t0 = time.time()
        forget, retain = data.split("forget"), data.split("retain")
        reg, lr = retain_term(rcfg.retain, model), cfg.lr
        if rcfg.sure:
            mask, lr = sure_mask(saliency(model, forget, forget_loss), rcfg.sure_gamma), 10 * cfg.lr
        if mask is not None:
            model.requires_grad_(False)
            for n, m in block_linears(model).items():
                m.weight.requires_grad_(n in mask)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = adamw(params, weight_dtype(cfg.dtype), lr=lr, weight_decay=0.0)
        gen = torch.Generator().manual_seed(cfg.seed)
        for step in range(cfg.steps + 1):  # pick sees the weights once more after the last step
            pool = torch.arange(len(forget)) if pick is None else pick(model, forget)
            stopped = "target reached" if pool is None else "steps" if step == cfg.steps else None
            if stopped:
                break
            batch = forget.select(pool[torch.randperm(len(pool), generator=gen)[:cfg.batch_size]])
            losses = {"forget": forget_loss(model, batch)}
            if reg is not None:
                draw = torch.randperm(len(retain), generator=gen)[:cfg.batch_size]
                losses["retain"] = reg(model, retain.select(draw))
            for name, v in losses.items():
                if not torch.isfinite(v):
                    raise SystemExit(f"step {step}: the {name} loss is {v.item()}; stopped, nothing saved. "
                                     f"Lower --lr (now {lr:g}).")
            opt.zero_grad(set_to_none=True)
            (losses["forget"] + rcfg.alpha * losses.get("retain", 0.0)).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            if step % cfg.log_interval == 0:
                ma = score(model, forget)["ma"].mean().item()
                print(f"step {step:4d} | " + " | ".join(f"{k} loss {v.item():.3f}" for k, v in losses.items())
                      + f" | forget MA {ma:.3f} | {time.time() - t0:.1f}s")
    model.requires_grad_(True)
    return model, dict(steps=step, seconds=round(time.time() - t0, 2), stopped=stopped, lr=lr,
                       trained=sorted(mask) if mask is not None else "all", compute=str(params[0].dtype)[6:])


# ----------------------------------------------------------------------------------------------------------------
# before and after the loop

def load_target(cfg):
    """(model, data): out_dir/target.pt in the requested dtype (trained first if missing) and the data it was
    trained on."""
    dtype = weight_dtype(cfg.dtype)
    torch.manual_seed(cfg.seed)
    dev = pick_device(cfg.device)
    model, ckpt = load_or_train("target", cfg.out_dir, dev)
    return to_dtype(model, dtype), load_data(DataConfig(**ckpt["data"]), cfg.out_dir)


def method_name(base, rcfg):
    """The method's name, as METHODS spells it: e.g. ('npo', --retain klr --sure) -> 'npo_klr_sure'."""
    if rcfg.retain not in ("none", "gdr", "klr"):
        raise SystemExit(f"--retain {rcfg.retain}: use none, gdr or klr")
    if rcfg.sure and rcfg.retain == "none":
        raise SystemExit("--sure is defined on the utility-constrained methods: add --retain gdr or --retain klr")
    return base + (f"_{rcfg.retain}" if rcfg.retain != "none" else "") + ("_sure" if rcfg.sure else "")


def save_result(method, model, data, stats, *cfgs):
    """Measures the unlearned model and writes out_dir/<method>.pt and out_dir/<method>.json, both atomically."""
    config = {k: v for c in cfgs for k, v in asdict(c).items()}
    with bf16_arithmetic(model):
        metrics = memorization(model, data)
        metrics["holdout_ppl"] = perplexity(model, data.general_val)
    out = Path(config["out_dir"])
    save_checkpoint(out / f"{method}.pt", model, kind=method, config=config, metrics=metrics, data=data.config,
                    **stats)
    write_json(out / f"{method}.json", dict(method=method, config=config, **stats, **metrics))
    print(f"{method}: forget exact {metrics['forget_exact']:.2f} MA {metrics['forget_ma']:.3f} | retain exact "
          f"{metrics['retain_exact']:.2f} MA {metrics['retain_ma']:.3f} | holdout MA {metrics['holdout_ma']:.3f} | "
          f"ppl {metrics['holdout_ppl']:.1f} | {stats['steps']} steps, {stats['seconds']}s -> {out / method}.pt")
    return metrics


