"""
Settings from the command line. Every script keeps its settings in a commented @dataclass; cli() turns its fields
into --name options (help = the field's comment, type = the default's type), and the dataclass's __post_init__
refuses values out of range with check_range(), so a bad setting fails with a usage message before anything runs.
"""
import argparse
import hashlib
import inspect
import platform
import re
from dataclasses import fields
from importlib.metadata import version
from pathlib import Path

import torch


def cli(doc, *classes, argv=None):
    """Parses --name value for every field of the given dataclasses; unknown names and wrong types fail with
    argparse's message, which lists the valid settings, and so do values the classes refuse. Returns one instance
    of each class."""
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
    change the order of float sums), for a bf16 run whether its arithmetic is bf16 or float32 (model.compute_dtype),
    and the code that computes it (a hash of the repository's Python files)."""
    return dict(device=device, torch=torch.__version__, threads=threads, bf16_native=bf16_native,
                transformers=version("transformers") if base else None, code=CODE_HASH)
