"""
Settings from the command line, and the plumbing every script shares: atomic writes, the digest the caches key on,
what a result depends on besides its settings, and the worker processes a study runs its jobs in.

Every script keeps its settings in a commented @dataclass; cli() turns its fields into --name options (help = the
field's comment, type = the default's type), and the dataclass's __post_init__ refuses values out of range with
check_range(), so a bad setting fails with a usage message before anything runs.
"""
import argparse
import ast
import concurrent.futures
import contextlib
import hashlib
import inspect
import io
import json
import multiprocessing
import os
import platform
import re
import signal
import sys
import tempfile
import time
from dataclasses import asdict, fields
from importlib.metadata import version
from pathlib import Path

import torch


def config_flags(path):
    """The settings of a config file (config/*.py, as nanoGPT's configurator reads them): lines `name = value` with a
    Python literal as the value, turned into the --name value flags they stand for (a bool into --name/--no-name).
    It is read, never run."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"{path}: no such config file; the configs are the files in config/ (e.g. config/smollm2.py)")
    flags = []
    for stmt in ast.parse(p.read_text(), str(p)).body:
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):  # a docstring
            continue
        try:
            (target,), value = stmt.targets, ast.literal_eval(stmt.value)
            name = target.id
        except (AttributeError, ValueError, TypeError):
            raise SystemExit(f"{path}, line {stmt.lineno}: a config holds only lines `name = value` with a literal "
                             f"value (a number, a string, True/False)") from None
        flags += [f"--{name}" if value else f"--no-{name}"] if isinstance(value, bool) else [f"--{name}", str(value)]
    return flags


def cli(doc, *classes, argv=None):
    """Parses --name value for every field of the given dataclasses, after the settings of a config file given first
    (config_flags; the command line's own flags win); unknown names and wrong types fail with argparse's message,
    which lists the valid settings, and so do values the classes refuse. Returns one instance of each class."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].endswith(".py"):
        argv = config_flags(argv[0]) + argv[1:]
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


def check_range(cfg, **valid):
    """Refuses a setting out of its range, naming the range: valid maps a field of the settings dataclass cfg to
    '> X', '>= X' or 'LO..HI' (inclusive). Raises ValueError, which cli() turns into a usage message."""
    for name, rule in valid.items():
        v = getattr(cfg, name)
        if ".." in rule:
            lo, hi = map(float, rule.split(".."))
            ok, say = lo <= v <= hi, f"in [{lo:g}, {hi:g}]"
        else:
            op, bound = rule.split()
            ok, say = (v > float(bound)) if op == ">" else (v >= float(bound)), rule
        if not ok:
            raise ValueError(f"--{name} {v}: must be {say}")


CODE = sorted(Path(__file__).resolve().parent.glob("*.py")) + [Path(__file__).resolve().parent / "data" / "prepare.py"]
CODE_HASH = hashlib.sha256(b"".join(p.read_bytes() for p in CODE)).hexdigest()[:16]  # read once, as the process
# imports its code: a file edited while a study runs does not re-key what this process computes with the old code


def cpu_name():
    """The CPU's model name, as lscpu shows it (/proc/cpuinfo), else what platform knows."""
    info = Path("/proc/cpuinfo")
    names = [ln.split(":", 1)[1].strip() for ln in info.read_text().splitlines() if ln.startswith("model name")] \
        if info.exists() else []
    return names[0] if names else platform.processor() or platform.machine()


def environment(device, base, threads, bf16_native=None):
    """What moves a result besides its settings and the checkpoints it reads, for the study's caches to key on: the
    device, the torch version (and transformers' with a Hugging Face base), the torch threads a job runs with (they
    change the order of float sums), for a bf16 run whether its matmuls are the hardware's or float32 ones rounded
    to bf16 (train.bf16_arithmetic: the same numbers up to float order), and the code that computes it (a hash of
    the repository's Python files)."""
    return dict(device=device, torch=str(torch.__version__), threads=threads, bf16_native=bf16_native,
                transformers=version("transformers") if base else None, code=CODE_HASH)


# ----------------------------------------------------------------------------------------------------------------
# files: written atomically (an interrupted run leaves the old file or none, never half of one); a checkpoint is
# one plain dict, loadable with weights_only=True (model.load_checkpoint)

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


# ----------------------------------------------------------------------------------------------------------------
# the study's worker processes

@contextlib.contextmanager
def job_threads(threads):
    """Jobs run in this process (--workers 1) with the torch threads of a worker's."""
    n = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def machine(device, workers, threads):
    """Where the numbers come from: the platform, the CPU's model and torch's kernel level for it (AVX2, AVX512,
    ...: pure bf16 is native only on some), the device, the workers and each job's torch threads."""
    return dict(platform=platform.platform(), cpu=cpu_name(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                cpu_count=os.cpu_count(), device=device, workers=workers, job_threads=threads)


class Stopped(BaseException):
    """SIGTERM in a worker: unwinds the job it runs (atomic writes remove their temporary files), then it exits."""


BUSY = []  # in a worker: non-empty while it runs a job


def terminated(signum, frame):
    if BUSY:
        raise Stopped()
    os._exit(143)


def start_worker(threads):
    """A worker process with that many torch threads; SIGTERM ends its job cleanly (in_worker), then the process.
    Ctrl-C is left to the study, which stops the workers."""
    torch.set_num_threads(threads)
    signal.signal(signal.SIGTERM, terminated)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def in_worker(fn, *args):
    """fn(*args) in a worker; stopped by SIGTERM, the worker exits after fn's cleanup (concurrent.futures would send
    the exception back and wait for the next job)."""
    BUSY.append(fn)
    try:
        return fn(*args)
    except Stopped:
        os._exit(143)
    finally:
        BUSY.clear()


def stop_workers(pool):
    """Ends the workers of a study that is being stopped: each one unwinds its job and exits (start_worker)."""
    for p in multiprocessing.active_children():
        p.terminate()
    pool.shutdown(cancel_futures=True)


def jobs(pool, fn, args, threads):
    """Yields (args, fn(*args)) for each tuple of args, as the jobs finish in the pool (here, with that many torch
    threads, without one)."""
    if pool is None:
        with job_threads(threads):
            yield from ((a, fn(*a)) for a in args)
        return
    futures = {pool.submit(in_worker, fn, *a): a for a in args}
    for f in concurrent.futures.as_completed(futures):
        yield futures[f], f.result()


class Progress:
    """A line per finished stage: the time since the start, and what is left, estimated from the mean time of the
    units of each kind done so far (before the first one, `guess`: GUESS's toy GPT or real model at its default
    settings, on 2 CPU cores: RESULTS.md, sections 1a and 4), the methods and rows shared among the workers."""
    GUESS = dict(gpt=dict(train=300.0, method=10.0, row=2.0), hf=dict(train=600.0, method=190.0, row=19.0))

    def __init__(self, workers, guess, **todo):
        self.t0, self.workers, self.guess, self.todo = time.time(), workers, guess, todo
        self.spent = {k: [] for k in todo}

    def done(self, kind, what, seconds, n=1):
        self.todo[kind] = max(0, self.todo[kind] - n)
        self.spent[kind] += [seconds / n] * n
        each = {k: sum(v) / len(v) if v else self.guess[k] for k, v in self.spent.items()}
        left = sum(n * each[k] / (1 if k == "train" else self.workers) for k, n in self.todo.items())
        print(f"[{time.time() - self.t0:5.0f}s] {what} ({seconds:.1f}s) | ~{left:.0f}s left", flush=True)
        return round(seconds, 2)
