"""sweep.py: two conditions on the tiny target, read back on a second run."""
import json
import shutil
from dataclasses import asdict

import torch

import sweep


def test_slug_and_flags():
    assert sweep.slug({"lr": 1e-4, "steps": 100}) == "lr_0.0001_steps_100" and sweep.slug({}) == "default"
    assert sweep.slug({"book": "../x/a b.txt"}) == "book_.._x_a_b.txt"
    long = {f"n{i}": 64 for i in range(20)}
    assert len(sweep.slug(long)) == 77 and sweep.slug(long) != sweep.slug({**long, "n0": 65})
    assert sweep.flags({"lr": 1e-4, "steps": 100}) == "--lr 0.0001 --steps 100"


def test_sweep_on_the_tiny_model(tiny, tmp_path):
    """Two conditions of the sweep (a learning rate, and a seed reference in pure bf16) on the tiny target, which is
    linked in as the sweep's target for its settings; then the same sweep again reads everything back."""
    skip = ("out_dir", "seed", "device", "force", "log_interval")
    train = {k: v for c in (tiny.cfg, tiny.dcfg) for k, v in asdict(c).items() if k not in skip}
    shutil.copytree(tiny.out_dir, tmp_path / "out" / "sweep" / sweep.slug({**train, "seed": 1337}))
    unlearn = dict(lr=1e-3, steps=4)
    conds = [sweep.condition("lr", "float32", unlearn, train, methods=["ga_gdr"]),
             sweep.condition("seed", "bfloat16", unlearn, train, methods=["ga_gdr", "ga_gdr_sure", "ga", "sga", "tau"])]
    cfg = sweep.SweepConfig(out_dir=str(tmp_path / "out"), fig_dir=str(tmp_path), precisions="fp32,int8,rtn4",
                            workers=1)
    res = sweep.sweep(cfg, conds)
    assert res == json.loads((tmp_path / "out" / "sweep.json").read_text())
    lr, seed = res["conditions"]
    assert lr["dir"].endswith("dtype_float32_lr_0.001_steps_4") and seed["dir"].endswith("bfloat16_lr_0.001_steps_4")
    assert lr["unlearn"] == unlearn and lr["train"] == train  # a condition is data, read back as it was given
    assert {r["model"] for r in lr["rows"]} == {"target", "retrain", "ga_gdr"}
    assert {r["precision"] for r in lr["rows"]} == {"fp32", "int8", "rtn4"}
    assert set(seed["retained"]["rtn4"]) == {"constrained", "sure"}
    head = res["headline"]["bfloat16"]
    assert head["seeds"] == [1337] and set(head["finding2"]) == {"target", "ga", "sga", "tau", "ga_gdr",
                                                                 "ga_gdr_sure"}
    mean, sd = head["retained"]["fp32"]["constrained"]["forget_exact"]
    assert mean == seed["retained"]["fp32"]["constrained"]["forget_exact"] and sd == 0
    unlearned = torch.load(tmp_path / "out" / "sweep" / seed["dir"] / "ga_gdr.pt", weights_only=True)
    assert unlearned["model"]["lm_head.weight"].dtype == torch.bfloat16
    assert (tmp_path / "6_when.png").read_bytes()[:4] == b"\x89PNG"
    rows = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "sweep").rglob("rows/*.json")}
    assert sweep.sweep(cfg, conds)["conditions"] == res["conditions"]
    assert {p: p.stat().st_mtime_ns for p in rows} == rows
