"""study/sweep.py: two conditions on the tiny target, read back on a second run."""
import json
import shutil
from dataclasses import asdict, replace

import numpy as np
import pytest

import torch

import figures
from study import sweep


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
    cfg = sweep.SweepConfig(out_dir=str(tmp_path / "out"), fig_dir=str(tmp_path), precisions="full,int8,rtn4",
                            workers=1)
    res = sweep.sweep(cfg, conds)
    assert res == json.loads((tmp_path / "out" / "sweep.json").read_text())
    lr, seed = res["conditions"]
    assert lr["dir"].endswith("dtype_float32_lr_0.001_steps_4") and seed["dir"].endswith("bfloat16_lr_0.001_steps_4")
    assert lr["unlearn"] == unlearn and lr["train"] == train  # a condition is data, read back as it was given
    assert {r["model"] for r in lr["rows"]} == {"target", "retrain", "ga_gdr"}
    assert {r["precision"] for r in lr["rows"]} == {"full", "int8", "rtn4"}
    assert set(seed["retained"]["rtn4"]) == {"constrained", "sure"}
    head = res["headline"]["bfloat16"]
    assert head["seeds"] == [1337] and set(head["finding2"]) == {"target", "ga", "sga", "tau", "ga_gdr",
                                                                 "ga_gdr_sure"}
    mean, sd = head["retained"]["full"]["constrained"]["forget_exact"]
    assert mean == seed["retained"]["full"]["constrained"]["forget_exact"] and sd == 0
    unlearned = torch.load(tmp_path / "out" / "sweep" / seed["dir"] / "ga_gdr.pt", weights_only=True)
    assert unlearned["model"]["lm_head.weight"].dtype == torch.bfloat16
    assert (tmp_path / "6_when.png").read_bytes()[:4] == b"\x89PNG"
    rows = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "sweep").rglob("rows/*.json")}
    assert sweep.sweep(cfg, conds)["conditions"] == res["conditions"]
    assert {p: p.stat().st_mtime_ns for p in rows} == rows


def test_scale_reads_the_width_axis_back_as_points(tiny, tmp_path):
    """--scale: the conditions' rows become one point each (width, lr, the constrained methods' means), written to
    scale.json with figure 9; the axis is each width at two learning rates in pure bf16."""
    axis = sweep.scale([64, 128, 256])
    assert [c["train"] for c in axis[:3]] == [dict(n_embd=64), {}, dict(n_embd=256)]  # 128: the sweep's target
    assert [c["unlearn"]["lr"] for c in axis] == [1e-4] * 3 + [3e-5] * 3
    assert {(c["dtype"], c["unlearn"]["lr"]) for c in axis} == {("bfloat16", 3e-5), ("bfloat16", 1e-4)}
    assert all(c["methods"] == ["ga_gdr", "npo_klr"] for c in axis)
    assert [c["unlearn"] for c in sweep.scale([32], [3e-5])] == [dict(lr=3e-5, steps=100)]
    skip = ("out_dir", "seed", "device", "force", "log_interval")
    train = {k: v for c in (tiny.cfg, tiny.dcfg) for k, v in asdict(c).items() if k not in skip}
    shutil.copytree(tiny.out_dir, tmp_path / "out" / "sweep" / sweep.slug({**train, "seed": 1337}))
    conds = [sweep.condition("width 64", "bfloat16", dict(lr=1e-3, steps=3), train, methods=["ga_gdr", "npo_klr"])]
    cfg = sweep.SweepConfig(out_dir=str(tmp_path / "out"), fig_dir=str(tmp_path), precisions="full,rtn4,fp4",
                            workers=1, scale=True)
    res = sweep.sweep(cfg, conds)
    assert res == json.loads((tmp_path / "out" / "scale.json").read_text())
    (q,) = res["points"]
    assert (q["model"], q["layers"], q["width"], q["lr"], q["steps"]) == ("GPT", 2, 64, 1e-3, 3)
    rows = {(r["model"], r["precision"]): r for r in res["conditions"][0]["rows"]}
    mean = lambda k, p: np.mean([rows[m, p][k] for m in ("ga_gdr", "npo_klr")])
    assert np.isclose(q["kept"], mean("mech_kept", "rtn4")) and np.isclose(q["moved"], mean("mech_moved", "rtn4"))
    assert np.isclose(q["retained_fp4"], mean("retained_verbmem_forget", "fp4"))
    assert np.isclose(q["excess_full"], mean("excess_verbmem_forget", "full"))
    law = figures.law_points(dict(rows=[r for r in rows.values() if r["precision"] in ("full", "rtn4")]))
    assert np.isclose(q["law_retained_rtn4"], np.mean([predicted for _, predicted, _ in law]))
    assert (tmp_path / "9_scale.png").read_bytes()[:4] == b"\x89PNG"
    assert sweep.sweep(replace(cfg, fig_dir=""), conds)["points"] == res["points"]  # read back, nothing rerun


@pytest.mark.parametrize("argv, says", [(["--widths", "64,abc"], "comma list of widths"),
                                        (["--widths", "66"], "multiple of 4"),
                                        (["--lrs", "1e-4,-1"], "positive learning rates"),
                                        (["--real", "no_such_dir"], "no results.json in no_such_dir")])
def test_bad_scale_settings_are_refused(argv, says, capsys):
    with pytest.raises(SystemExit):
        sweep.cli(sweep.__doc__, sweep.SweepConfig, argv=argv)
    assert says in capsys.readouterr().err
