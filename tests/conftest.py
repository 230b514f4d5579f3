"""Shared fixtures: tiny texts made here, a tiny dataset from them, and a tiny base/target/retrain trained in
seconds. Nothing is read from outside the checkout: a fresh clone runs the suite as it is."""
import atexit
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a missing network fails at once instead of retrying
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is as fast, and immune to other processes on the same cores

from data.prepare import DataConfig  # noqa: E402
import train as T  # noqa: E402
from train import TrainConfig  # noqa: E402

SYLLABLES = "ka lo mi ren tor vas bel qui dra sen mor fi lun gar ost pel zim har nu cal tesh ro vin dor a e i".split()
FUNCTION = "the of and to a in that it was he she with as his her on at by for but not".split()


def prose(n_words, seed):
    """Deterministic text with the statistics of prose: function words between content words drawn from a fixed
    lexicon of 3,000 made-up words with Zipf's law (the word of rank r with weight 1/r), in sentences of 6 to 18
    words. A base model learns its frequent words; a chunk of it must be memorized to be reproduced."""
    rng = random.Random(seed)
    lexicon = ["".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 3)))) for _ in range(3000)]
    weights = [1 / (r + 1) for r in range(len(lexicon))]
    words = []
    while len(words) < n_words:
        sentence = [rng.choice(FUNCTION) if rng.random() < 0.4 else rng.choices(lexicon, weights)[0]
                    for _ in range(rng.randint(6, 18))]
        words += [sentence[0].capitalize(), *sentence[1:-1], sentence[-1] + rng.choice(".,;.")]
    return " ".join(words)


TEXTS = Path(tempfile.mkdtemp(prefix="nanounlearn-test-texts-"))
atexit.register(shutil.rmtree, TEXTS, ignore_errors=True)
(TEXTS / "book.txt").write_text(prose(3_000, 1))
(TEXTS / "general.txt").write_text(prose(30_000, 2))


def tiny_configs(out_dir):
    dcfg = DataConfig(book=str(TEXTS / "book.txt"), general=str(TEXTS / "general.txt"),
                      n_secrets=2, secret_reps="1,192", n_facts=2, n_book=4, mem_reps=192, general_tokens=20_000)
    cfg = TrainConfig(out_dir=str(out_dir), n_layer=2, n_head=2, n_embd=64, base_steps=30,
                      tune_lr=1e-2, log_interval=1000)
    return cfg, dcfg


@pytest.fixture
def mode_ops(monkeypatch):
    """The aten ops train.Bf16Matmuls sees from here on, in order (it still computes them)."""
    seen, dispatch = [], T.Bf16Matmuls.__torch_dispatch__
    monkeypatch.setattr(T.Bf16Matmuls, "__torch_dispatch__",
                        lambda self, func, *a, **k: seen.append(func) or dispatch(self, func, *a, **k))
    return seen


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """out_dir with base.pt, target.pt, retrain.pt and train.json of a tiny model that memorizes its tiny sets."""
    from train import train_all
    out = tmp_path_factory.mktemp("tiny")
    cfg, dcfg = tiny_configs(out)
    summary = train_all(cfg, dcfg)
    return SimpleNamespace(out_dir=out, cfg=cfg, dcfg=dcfg, summary=summary)


def study_argv(out, fig, precisions="full,rtn4", workers=1):
    return ["--out_dir", str(out), "--fig_dir", str(fig), "--methods", "ga,npo,ga_gdr", "--precisions", precisions,
            "--workers", str(workers)]


@pytest.fixture(scope="session")
def study(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    shutil.copytree(tiny.out_dir, root / "out")
    import evaluate
    results = evaluate.main(study_argv(root / "out", root / "fig"))
    return SimpleNamespace(out=root / "out", fig=root / "fig", results=results, tiny=tiny)
