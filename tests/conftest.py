"""Shared fixtures: a tiny dataset from ../shared/data and a tiny base/target/retrain trained in seconds."""
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # a missing network fails at once instead of retrying
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # tiny models: one thread is as fast, and immune to other processes on the same cores

from data.prepare import BOOKS_DIR, DataConfig  # noqa: E402
from model import TrainConfig  # noqa: E402


def texts():
    """(book, general) public-domain texts for the tests: ../shared/data beside the checkout (as in CI), else the
    plays that data/prepare.py caches in data/books on its first run."""
    for book, general in ((SHARED / "alice_in_wonderland.txt", SHARED / "tinyshakespeare.txt"),
                          (BOOKS_DIR / "hamlet_gut.txt", BOOKS_DIR / "as_you_like_it_gut.txt")):
        if book.exists() and general.exists():
            return book, general
    pytest.skip("no public-domain texts: run `python data/prepare.py` once (it caches plays in data/books)")


def tiny_configs(out_dir):
    book, general = texts()
    dcfg = DataConfig(book=str(book), general=str(general),
                      n_secrets=2, secret_reps="1,192", n_facts=2, n_book=4, mem_reps=192, general_tokens=20_000)
    cfg = TrainConfig(out_dir=str(out_dir), n_layer=2, n_head=2, n_embd=64, base_steps=30, 
                      tune_lr=1e-2, log_interval=1000)
    return cfg, dcfg


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """out_dir with base.pt, target.pt, retrain.pt and train.json of a tiny model that memorizes its tiny sets."""
    from model import train_all
    out = tmp_path_factory.mktemp("tiny")
    cfg, dcfg = tiny_configs(out)
    summary = train_all(cfg, dcfg)
    return SimpleNamespace(out_dir=out, cfg=cfg, dcfg=dcfg, summary=summary)
