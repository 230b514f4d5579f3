"""
The study: every unlearning method, every precision, every metric, in one command (README, "Install and run";
RESULTS.md, section 2).

$ python evaluate.py                               # trains what is missing, runs the 14 methods, measures 16 models
                                                   # x 5 precisions -> out/results.json, out/results.csv, figures/*.png
$ python evaluate.py --methods ga_gdr,npo_klr --precisions full,rtn4,fp4
$ python evaluate.py --force                       # rerun every method, re-measure every row
$ python evaluate.py --dtype bfloat16 --unlearn_args "--lr 1e-4 --steps 100"   # pure bf16 unlearning, other lr
$ python evaluate.py --seeds 1337,1338,1339        # the study at three seeds -> out/seeds.json, mean ± sd
$ python evaluate.py --base hf:DIR --train_args "--tune_lr 1e-4" --out_dir out_hf   # a local Hugging Face causal LM
                                                   # as the base of it all (train.py; hf:smollm2 for SmolLM2-135M)
$ python evaluate.py config/smollm2.py --seeds 1337,1338,1339   # the real-model study (config/), each seed its data

base/target/retrain are trained only when missing (`python train.py --force` retrains them; models on disk trained
with other values of the settings --train_args names, or from another --base, are refused). The rest is keyed on
content, not on timestamps: a method runs again when its checkpoint is missing, or when out/runs/<method>.json, the
record of the run that made it, names other resolved settings (every default filled in), another environment
(device, torch/transformers versions, threads, the code: settings.environment), another target.pt or another
checkpoint (a hash of each); each (model, precision) row is cached in out/rows/ under a key of the model's and the
target's hashes, the settings and the environment. Quantized models live in memory only. Methods and rows run in
worker processes (--workers); SIGTERM or Ctrl-C stops them, and what had finished stays cached. Logs of training and
unlearning: out/logs/. The metrics themselves are in metrics.py, the figures in figures.py, and the sweep over
learning rates, dtypes and quantizers in study/sweep.py.
"""
import concurrent.futures
import contextlib
import copy
import csv
import importlib
import io
import json
import math
import multiprocessing
import os
import platform
import resource
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path

import torch

import durability
import figures
import metrics
import model as M
import quantize as QC
import train as T
from data.prepare import DataConfig, load_data
from settings import Progress, atomic_write_bytes, check_range, cli, digest, environment, in_worker, \
    job_threads, jobs, machine, start_worker, stop_workers, write_json
from report import mean_sd, per_sequence, pooled_sequences, relative, report
from unlearn import METHODS

PRECISIONS = {"full": None, **{QC.quant_name(q): q for q in (QC.QuantConfig(method=m, bits=b, **kw) for m, b, kw in (
    ("rtn", 8, dict(absmax=True)), ("rtn", 4, {}), ("gptq", 4, {}), ("nf4", 4, {}), ("fp4", 4, {}),
    ("rtn", 8, {}), ("rtn", 6, {}), ("rtn", 5, {}), ("gptq", 6, {}), ("awq", 4, {}), ("awq", 6, {}),
    ("gptq", 5, {}), ("awq", 5, {}), *((m, b, dict(calib="retain")) for b in (4, 5) for m in ("gptq", "awq")),
    ("rtn", 4, dict(sym=False)), ("gptq", 4, dict(group_size=128)),
    *(("rtn", 4, dict(group_size=g, sym=s)) for g in (32, 64, 128) for s in (True, False))))}}
# block Linears only; per output channel and symmetric (the paper's Eq. 2) unless the name says _asym (min-max) or
# _gN (a grid per N input columns, the last group ragged where N does not divide them); nf4/fp4 per block of 64.
# gptq and awq are calibrated on general text, or on the retain set where the name says _retain (QC.calibration_text).
# int8 is LLM.int8's absmax grid. "full" is full precision: the unquantized model, stored in its own dtype (float32,
# or bf16 in a pure-bf16 study: results.json's meta.settings.dtype), measured in float32 arithmetic (measure_model)
PACKAGES = ("torch", "numpy", "tiktoken", "matplotlib")  # their versions go into results.json


@dataclass
class StudyConfig:
    out_dir: str = "out"  # checkpoints are read and made here; results.json/.csv, rows/ and logs/ are written here
    fig_dir: str = "figures"  # where the figures go
    methods: str = ",".join(METHODS)  # comma list of the unlearning methods to run (when missing) and measure
    precisions: str = "full,int8,rtn4,gptq4,nf4"  # comma list: full (unquantized, always in), int8, rtn4, nf4, ...
    force: bool = False  # rerun every method and re-measure every row (`python train.py --force` retrains the models)
    seed: int = 1337  # training, unlearning, and GPTQ's calibration windows
    device: str = "auto"  # 'auto' = cuda if present, else cpu
    workers: int = 0  # processes running methods and measurements side by side; 0 = one per CPU core up to 4
    job_threads: int = 1  # torch threads of each method run and measurement (in every cache key: they change float order)
    el_stride: int = 16  # EL_10 starts at t = 1, 1+stride, ... and is measured at full precision only (0 = never)
    top_k: int = 10  # the likelihood-ranked extraction attack extracts the k likeliest forget sequences
    dtype: str = "float32"  # weights of the unlearning runs, float32 | bfloat16 (pure); target/retrain measured in it
    unlearn_args: str = ""  # more settings for every unlearning script, e.g. "--lr 1e-4 --steps 100"
    seeds: str = ""  # comma list, e.g. 1337,1338,1339: the study at each seed -> out/seeds.json, mean ± sd
    durability: bool = False  # then relearning attacks on every model and the durability card (durability.py)
    base: str = ""  # '' = the GPT of model.py; hf:DIR = a local Hugging Face causal LM as the base (train.py --base)
    train_args: str = ""  # more settings of train.py and data/prepare.py, e.g. "--tune_lr 1e-4 --n_facts 5"
    vary_data: bool = False  # with --seeds: each seed draws its own data as well (data/prepare.py's --data_seed)

    def __post_init__(self):
        check_range(self, workers=">= 0", job_threads=">= 1", el_stride=">= 0", top_k=">= 1")


def names(value, valid, flag):
    """The names of a comma list, each one checked against the valid ones."""
    got = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in got if v not in valid]
    if bad or not got:
        raise SystemExit(f"--{flag} {value!r}: {'unknown ' + ', '.join(bad) if bad else 'no names'}; "
                         f"the valid ones are {','.join(valid)}")
    return list(dict.fromkeys(got))


def logged(log, fn, *args):
    """fn(*args) with what it prints sent to the file `log`, so that the study's own output stays one line a stage;
    line-buffered, so that `tail -f` on it follows a long stage (a pretrained model's fine-tuning) as it goes."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w", buffering=1) as f, contextlib.redirect_stdout(f):
        return fn(*args)


def command(cfg, name):
    """The command line that makes out_dir/<name>.pt: the method's script with the study's out_dir, seed, device,
    dtype and unlearn_args."""
    return (METHODS[name].split() + ["--out_dir", cfg.out_dir, "--seed", str(cfg.seed), "--device", cfg.device,
                                     "--dtype", cfg.dtype] + shlex.split(cfg.unlearn_args))


def resolved(cfg, name):
    """The settings the method's run resolves its command line to (every default filled in), as one dict: a default
    that changes changes them, where the command line would not."""
    module, *argv = command(cfg, name)
    mod = importlib.import_module(module)
    return {k: v for c in cli(mod.__doc__, *mod.SETTINGS, argv=argv) for k, v in asdict(c).items()}


def env(cfg):
    """The environment (settings.environment) of the study's jobs."""
    dev = M.pick_device(cfg.device)
    return environment(dev, cfg.base, cfg.job_threads, T.bf16_native(dev) if cfg.dtype == "bfloat16" else None)


def made(cfg, name):
    """The record of the run that made out_dir/<name>.pt (its resolved settings, the environment, and the hashes of
    the target it started from and of the checkpoint it wrote), if it still describes what is on disk and what the
    study would run; else None."""
    out = Path(cfg.out_dir)
    try:
        rec = json.loads((out / "runs" / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
    now = dict(settings=resolved(cfg, name), environment=env(cfg), target=digest(out / "target.pt"),
               result=digest(out / f"{name}.pt"))
    return rec if {k: rec.get(k) for k in now} == now else None


def run_method(cfg, name):
    """A job: the method's script, through its main(argv), as command(cfg, name) says; records the run in
    out/runs/<name>.json and returns the seconds it took."""
    module, *argv = command(cfg, name)
    out, t = Path(cfg.out_dir), time.time()
    log, target = out / "logs" / f"{name}.log", digest(out / "target.pt")

    def run():
        print(shlex.join(["python", module, *argv]), flush=True)
        importlib.import_module(module).main(argv)
    try:
        logged(log, run)
    except SystemExit as e:
        raise SystemExit(f"{name} (python {module}.py {shlex.join(argv)}) failed: {e}\nits log: {log}") from None
    write_json(out / "runs" / f"{name}.json", dict(command=[module, *argv], settings=resolved(cfg, name),
                                                     environment=env(cfg), target=target,
                                                     result=digest(out / f"{name}.pt")))
    return time.time() - t


def plain(x):
    """JSON-safe copy: nan and inf become null (json.dumps would write NaN, which strict readers refuse)."""
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def row_key(cfg, name, prec):
    """What a row depends on: the model's and the target's checkpoint (hashes), the settings that measure it, and
    the environment."""
    out = Path(cfg.out_dir)
    quant = PRECISIONS[prec] and asdict(replace(PRECISIONS[prec], seed=cfg.seed))
    return dict(model=digest(out / f"{name}.pt"), target=digest(out / "target.pt"), quant=quant, dtype=cfg.dtype,
                el_stride=cfg.el_stride, top_k=cfg.top_k, environment=env(cfg))


def cached(cfg, name, prec):
    """The cached row of (model, precision) if it is still valid, else None."""
    path = Path(cfg.out_dir) / "rows" / f"{name}_{prec}.json"
    try:
        c = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return c if c.get("key") == row_key(cfg, name, prec) else None


def measure_model(cfg, name, precisions):
    """A job: the rows of one model at the given precisions, each a copy quantized in memory and measured, for the
    unlearned models with the mechanism against the target (at gptq/awq only its `kept`, from the target quantized
    the same way: metrics.update_kept); each row is cached in out/rows/. Every
    row is measured in float32 arithmetic: a bf16 model's weights are float32 numbers exactly, so the unquantized
    row is the stored model itself, and a quantized copy holds exactly its quantizer's levels (written back into
    bf16 weights they would be rounded again: at int8, 99% of them off the grid)."""
    out, dev, dtype, res = Path(cfg.out_dir), M.pick_device(cfg.device), M.weight_dtype(cfg.dtype), []
    target, ckpt = M.load_checkpoint(out / "target.pt", dev)
    data = load_data(DataConfig(**ckpt["data"]), out)
    target, model = M.to_dtype(target, dtype), M.to_dtype(M.load_checkpoint(out / f"{name}.pt", dev)[0], dtype)
    references = {}  # lm_head -> the output error's reference: the model's own, so one for all its precisions
    for p in precisions:
        t, qmodel, qcfg, quant = time.time(), M.to_dtype(copy.deepcopy(model), torch.float32), PRECISIONS[p], {}
        row = dict(model=name, precision=p)
        if qcfg is not None:
            qcfg = replace(qcfg, seed=cfg.seed)
            if qcfg.lm_head not in references:
                references[qcfg.lm_head] = QC.heldout_reference(qmodel, qcfg, data)
            _, quant = QC.quantize_with(qmodel, qcfg, data, references[qcfg.lm_head])
            row["quant_error"] = quant["rel_output_error"]  # mean relative output error of the Linears
        row.update(metrics.measure(qmodel, data, cfg.el_stride if qcfg is None else 0, cfg.top_k))
        if quant and quant["method"] in QC.CALIBRATED and name in METHODS:  # kept from Q(θ_o), made the same way
            qtarget = M.to_dtype(copy.deepcopy(target), torch.float32)
            QC.quantize_with(qtarget, qcfg, data)
            mech = metrics.update_kept(target, model, qtarget, qmodel, quant["lm_head"])
            row.update(mech_moved=mech["moved"], mech_kept=mech["kept"])
        elif quant and name in METHODS:
            mech = metrics.mechanism(target, model, quant)
            pooled = mech["all"]
            row.update(mech_hist=[h / pooled["n"] for h in pooled["hist"]], mech_moved=pooled["moved"],
                       mech_same=pooled["same"], mech_same_moved=pooled["same_moved"],  # moved, yet rounds back
                       mech_kept=pooled["kept"], mech_layers={  # the same per quantized matrix
                           n: {k: r[k] for k in ("moved", "same", "same_moved", "kept")}
                           for n, r in mech["layers"].items()})
        res.append(dict(key=row_key(cfg, name, p), row=plain(row),
                        seconds=dict(quantize=quant.get("seconds", 0.0), total=round(time.time() - t, 2))))
        write_json(out / "rows" / f"{name}_{p}.json", res[-1])
    return res


def run_and_measure(pool, cfg, run, todo):
    """Yields ("method", name, seconds) and ("rows", name, rows) as the jobs finish: the methods to run, and the rows
    of every model, a method's as soon as it has run, one job per row (so no worker waits for the slowest method, or
    idles while another measures a model's last rows)."""
    if pool is None:
        with job_threads(cfg.job_threads):
            yield from (("method", m, run_method(cfg, m)) for m in run)
            yield from (("rows", n, measure_model(cfg, n, ps)) for n, ps in todo.items() if ps)
        return
    rows = lambda n: {pool.submit(in_worker, measure_model, cfg, n, [p]): ("rows", n) for p in todo[n]}
    pending = {pool.submit(in_worker, run_method, cfg, m): ("method", m) for m in run}
    for n in (n for n in todo if n not in run):
        pending.update(rows(n))
    while pending:
        done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for f in done:
            kind, name = pending.pop(f)
            if kind == "method":
                pending.update(rows(name))
            yield kind, name, f.result()


def cpu_time():
    """CPU seconds (user + system) of this process and of its finished child processes (the workers)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def write_csv(path, rows):
    """One line per (model, precision), the scalar columns (the per-sequence lists are in results.json)."""
    cols = list(dict.fromkeys(k for r in rows for k, v in r.items() if not isinstance(v, (list, dict))))
    buf = io.StringIO()
    w = csv.DictWriter(buf, cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())


def stop(signum, frame):
    raise SystemExit(f"stopped ({signal.Signals(signum).name}): what had finished is cached; rerun the same "
                     f"command to go on from there")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg, rcfg = cli(__doc__, StudyConfig, durability.RelearnConfig, argv=argv)
    signal.signal(signal.SIGTERM, stop)  # unwinds as Ctrl-C does: the workers are stopped, partial files removed
    if cfg.seeds:
        return over_seeds(cfg, argv)
    M.weight_dtype(cfg.dtype)  # refuses an unknown one before anything runs
    methods = names(cfg.methods, METHODS, "methods")
    precisions = list(dict.fromkeys(["full", *names(cfg.precisions, PRECISIONS, "precisions")]))
    out, dev, t_start, seconds, cpu_start = Path(cfg.out_dir), M.pick_device(cfg.device), time.time(), {}, cpu_time()
    workers = cfg.workers or (1 if dev.startswith("cuda") else min(4, os.cpu_count() or 1))
    models = ["target", "retrain", *methods]
    tcfg, dcfg = cli(T.__doc__, T.TrainConfig, DataConfig, argv=shlex.split(cfg.train_args) + [
        "--out_dir", cfg.out_dir, "--device", cfg.device, "--seed", str(cfg.seed), "--base", cfg.base])
    given = {a[2:].split("=")[0].removeprefix("no-") for a in shlex.split(cfg.train_args) if a.startswith("--")}
    T.check_settings(out, tcfg, dcfg, only=given | {"base"})  # the models on disk are the study's, unless told
    train = not all((out / f"{n}.pt").exists() for n in ("target", "retrain"))
    run = [m for m in methods if cfg.force or train or made(cfg, m) is None]  # missing, or made otherwise
    todo = {n: [p for p in precisions if cfg.force or n in run or cached(cfg, n, p) is None] for n in models}
    guess = Progress.GUESS["hf" if cfg.base.startswith("hf:") else "gpt"]
    progress = Progress(workers, guess, train=int(train), method=len(run), row=sum(map(len, todo.values())))
    print(f"study: {'training base/target/retrain, ' if train else ''}{len(run)} of {len(methods)} methods to run, "
          f"{progress.todo['row']} of {len(models) * len(precisions)} rows to measure, {workers} worker(s); "
          f"logs in {out / 'logs'}" + (f" (tail -f {out / 'logs' / 'train.log'} follows training)" if train else ""),
          flush=True)
    if train:
        t = time.time()
        logged(out / "logs" / "train.log", T.train_all, tcfg, dcfg)
        seconds["train"] = progress.done("train", "data, base, target, retrain", time.time() - t)

    pool = None if workers == 1 else concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=multiprocessing.get_context("spawn"), initializer=start_worker, initargs=(cfg.job_threads,))
    try:
        t_rows, fresh = time.time(), {}
        for kind, name, res in run_and_measure(pool, cfg, run, todo):
            fresh.update({(name, c["row"]["precision"]): c for c in res} if kind == "rows" else {})
            if kind == "method":
                seconds.setdefault("methods", {})[name] = progress.done("method", f"{name} -> {out / name}.pt", res)
            else:
                progress.done("row", f"{name} at {', '.join(c['row']['precision'] for c in res)}",
                              sum(c["seconds"]["total"] for c in res), len(res))
        curves = {name: res for (_, _, name), res in jobs(pool, durability.relearn_model,
                                                          [(cfg, rcfg, n) for n in models if cfg.durability],
                                                          cfg.job_threads)}
    except BaseException:
        if pool is not None:
            stop_workers(pool)
        raise
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    cache = {(n, p): fresh.get((n, p)) or cached(cfg, n, p) for n in models for p in precisions}
    rows = [c["row"] for c in cache.values()]
    summary = relative(rows, precisions)
    matched = metrics.damage_matched({r["precision"]: r["verbmem_forget"] for r in rows if r["model"] == "target"})
    seconds.update(methods_and_rows=round(time.time() - t_rows, 2),  # one span: with workers they overlap
                   per_row={f"{n}_{p}": c["seconds"] for (n, p), c in cache.items()})

    _, target_ckpt = M.load_checkpoint(out / "target.pt")
    method_meta = {m: {k: v for k, v in json.loads((out / f"{m}.json").read_text()).items()
                       if k in ("config", "steps", "stopped", "lr", "trained", "seconds")}
                   for m in methods if (out / f"{m}.json").exists()}
    meta = dict(seed=cfg.seed, settings=asdict(cfg), models=models, precisions=precisions,
                rows_measured=sum(map(len, todo.values())),  # the others came from out/rows/
                versions=dict(python=platform.python_version(), **{p: version(p) for p in PACKAGES + (
                    ("transformers",) if cfg.base else ())}),
                corpora=target_ckpt["corpora"], data=target_ckpt["data"], training=target_ckpt["config"],
                methods=method_meta, damage_matched=matched, mech_bins=list(metrics.RATIO_BINS[:-1]), seconds=seconds,
                quantizers={p: PRECISIONS[p] and asdict(replace(PRECISIONS[p], seed=cfg.seed)) for p in precisions},
                machine=machine(dev, workers, cfg.job_threads))
    results = plain(dict(meta=meta, retained=summary, rows=rows, per_sequence=per_sequence(rows, precisions)))
    if cfg.durability:
        results["durability"] = plain(dict(settings=asdict(rcfg), curves={n: curves[n] for n in models},
                                           card=durability.card(rows, {n: curves[n] for n in models}, precisions[1:])))
        write_json(out / "durability.json", results["durability"])
        write_csv(out / "durability.csv", [dict(model=n, **r) for n, r in results["durability"]["card"].items()])
    t = time.time()
    paths = figures.figures(results, cfg.fig_dir) if cfg.fig_dir else []
    seconds.update(figures=round(time.time() - t, 2), total=round(time.time() - t_start, 2),
                   cpu=round(cpu_time() - cpu_start, 2))  # of this process and its workers, all cores
    results["meta"]["seconds"] = seconds
    write_json(out / "results.json", results)
    write_csv(out / "results.csv", results["rows"])
    report(results)
    print(f"wrote {out / 'results.json'}, {out / 'results.csv'} and {len(paths)} figures in {cfg.fig_dir}/ "
          f"({seconds['total']:.0f}s, {seconds['cpu']:.0f} CPU-seconds)")
    return results


def seed_list(value):
    """--seeds: a comma list of distinct integers."""
    got = [v.strip() for v in value.split(",") if v.strip()]
    if not got or not all(v.lstrip("-").isdigit() for v in got) or len(set(map(int, got))) < len(got):
        raise SystemExit(f"--seeds {value!r}: give a comma list of distinct integer seeds, e.g. 1337,1338,1339")
    return [int(v) for v in got]


def over_seeds(cfg, argv):
    """--seeds: the study once per seed (the first in out_dir itself, the others in out_dir/seed_<s>, each with its
    own base/target/retrain; the data are the same unless --vary_data), then every number's mean ± sample sd over
    the seeds: out_dir/seeds.json, and Table 1 with its spreads, printed."""
    seeds, t0 = seed_list(cfg.seeds), time.time()
    data = lambda s: ["--train_args", f"{cfg.train_args} --data_seed {s}"] if cfg.vary_data else []
    runs = [main([*argv, "--seeds", "", "--seed", str(s), *data(s)] + ([] if i == 0 else [
        "--out_dir", str(Path(cfg.out_dir) / f"seed_{s}"), "--fig_dir", ""])) for i, s in enumerate(seeds)]
    by = {}
    for run in runs:
        for r in run["rows"]:
            by.setdefault((r["model"], r["precision"]), []).append(r)
    rows = [dict(model=m, precision=p, **{k: mean_sd([r[k] for r in rs]) for k, v in rs[0].items()
                                          if isinstance(v, (int, float)) and not isinstance(v, bool)})
            for (m, p), rs in by.items()]
    retained = {p: {g: {k: mean_sd([run["retained"][p][g][k] for run in runs]) for k in v if k != "methods"}
                    for g, v in groups.items()} for p, groups in runs[0]["retained"].items()}
    meta = dict(seeds=seeds, seconds=round(time.time() - t0, 1), precisions=runs[0]["meta"]["precisions"],
                damage_matched=[run["meta"]["damage_matched"] for run in runs],
                machine=runs[0]["meta"]["machine"], settings=runs[0]["meta"]["settings"])
    results = plain(dict(meta=meta, retained=retained, rows=rows, per_sequence=pooled_sequences(runs)))
    if "durability" in runs[0]:
        cards = [run["durability"]["card"] for run in runs]
        results["durability"] = {n: {k: mean_sd([c[n][k] for c in cards]) for k in r} for n, r in cards[0].items()}
    write_json(Path(cfg.out_dir) / "seeds.json", results)
    print(f"\nTable 1 over seeds {seeds} (mean ± sample sd)")
    report(results)
    return results


if __name__ == "__main__":
    main()
