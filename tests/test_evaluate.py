"""evaluate.py: the one-command study end to end on the tiny models of conftest.py, its caches and its refusals."""
import csv
import itertools
import json
import shutil

import matplotlib.image
import pytest

import evaluate as ev
import figures
from conftest import study_argv

ROW_KEYS = ("model", "precision", "verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak", "forget_exact",
             "forget_ma", "holdout_ppl", "retain_exact", "retain_ma")  # what every results.json row holds
MODELS, PRECS = ["target", "retrain", "ga", "npo", "ga_gdr"], ["fp32", "rtn4"]


def test_study_writes_every_key_and_the_figures(study, tmp_path):
    assert study.seconds < 60
    res = json.loads((study.out / "results.json").read_text())
    assert res == study.results
    meta = res["meta"]
    assert meta["seed"] == 1337 and {"python", "torch"} <= set(meta["versions"])
    assert meta["corpora"]["book"] == "file book.txt"
    assert set(meta["seconds"]["methods"]) == {"ga", "npo", "ga_gdr"} and meta["rows_measured"] == 10
    assert {"platform", "cpu_count", "device"} <= set(meta["machine"])
    rows = {(r["model"], r["precision"]): r for r in res["rows"]}
    assert list(rows) == list(itertools.product(MODELS, PRECS))
    for (m, p), r in rows.items():
        assert all(isinstance(r[k], (int, float)) for k in ROW_KEYS[2:]), (m, p)
        assert 0 <= r["verbmem_forget"] <= 100 and 0 <= r["forget_exact"] <= 1 and r["holdout_ppl"] > 1
        assert len(r["forget_ma_seq"]) == 16 and r["outliers_low"] + r["outliers_high"] <= 16
        assert (r["forget_el"] is None) == (p != "fp32")  # EL_n at full precision only
        assert ("mech_hist" in r) == (m in ("ga", "npo", "ga_gdr") and p == "rtn4")
    for p in PRECS:  # the references: retrain leaks 0 against itself, the target retains 100% of itself
        assert rows["retrain", p]["privleak"] == 0.0 and rows["target", p]["retained_verbmem_forget"] == 100.0
    assert sum(rows["ga", "rtn4"]["mech_hist"]) == pytest.approx(1.0)
    # the same numbers as the training and unlearning scripts measured on the same checkpoints
    assert rows["target", "fp32"]["forget_ma"] == pytest.approx(study.tiny.summary["target"]["forget_ma"])
    ga = json.loads((study.out / "ga.json").read_text())
    assert rows["ga", "fp32"]["forget_exact"] == pytest.approx(ga["forget_exact"])
    with open(study.out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 10 and set(ROW_KEYS) <= set(table[0])
    pngs = sorted(study.fig.glob("*.png"))
    assert [p.name[0] for p in pngs] == list("12345")
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(p).shape[0] > 100
    # the figures are drawn from results.json alone
    assert [p.read_bytes() for p in figures.figures(res, tmp_path)] == [p.read_bytes() for p in pngs]


def test_figure8_puts_each_quantized_unlearned_row_beside_its_law(study, tmp_path):
    res = study.results
    pts = figures.law_points(res)
    by = {(r["model"], r["precision"]): r for r in res["rows"]}
    quantized = [r for r in res["rows"] if r.get("mech_kept") is not None and r["retained_verbmem_forget"] is not None]
    assert len(pts) == len(quantized) > 0
    for (measured, law, null), r in zip(pts, quantized):
        fp = by[r["model"], "fp32"]["retained_verbmem_forget"]
        assert measured == r["retained_verbmem_forget"] and null == fp
        assert law == pytest.approx(100 - r["mech_kept"] * (100 - fp))
    excess = figures.law_points(res, share="excess")
    defined = [r for r in quantized if None not in (r["excess_verbmem_forget"],
                                                     by[r["model"], "fp32"]["excess_verbmem_forget"])]
    assert len(excess) == len(defined)
    for (measured, law, null), r in zip(excess, defined):
        fp = by[r["model"], "fp32"]["excess_verbmem_forget"]
        assert measured == r["excess_verbmem_forget"] and law == pytest.approx(100 - r["mech_kept"] * (100 - fp))
    path, fit = figures.figure8({"tiny": res}, tmp_path)
    assert path.read_bytes()[:4] == b"\x89PNG" and fit["tiny"]["retained"][0] == len(pts)
    assert fit["tiny"].get("excess", (0,))[0] == len(excess)


def test_bad_names_are_refused_with_the_valid_list(tmp_path):
    with pytest.raises(SystemExit, match="unknown nope; the valid ones are ga,ga_gdr,ga_klr,npo"):
        ev.main(["--out_dir", str(tmp_path / "out"), "--methods", "ga,nope"])
    with pytest.raises(SystemExit, match="unknown int3; the valid ones are fp32,int8,rtn4,gptq4,nf4,fp4"):
        ev.main(["--out_dir", str(tmp_path / "out"), "--precisions", "fp32,int3"])
    assert not (tmp_path / "out").exists()


def test_second_run_reuses_cached_rows(study):
    stamps = {p: p.stat().st_mtime_ns for p in [*study.out.glob("rows/*.json"), *study.out.glob("*.pt")]}
    again = ev.main(study_argv(study.out, study.fig))
    assert again["rows"] == study.results["rows"] and again["meta"]["rows_measured"] == 0
    assert "methods" not in again["meta"]["seconds"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # one more precision: only its rows are measured, in two worker processes
    more = ev.main(study_argv(study.out, study.fig, "fp32,rtn4,int8", workers=2))
    assert more["meta"]["rows_measured"] == 5
    assert [r for r in more["rows"] if r["precision"] != "int8"] == study.results["rows"]


def test_same_seed_same_numbers(study, tmp_path):
    shutil.copytree(study.out, tmp_path / "out")
    forced = ev.main(study_argv(tmp_path / "out", tmp_path / "fig", "fp32") + ["--methods", "ga", "--force"])
    assert forced["meta"]["rows_measured"] == 3 and set(forced["meta"]["seconds"]["methods"]) == {"ga"}
    first = {(r["model"], r["precision"]): r for r in study.results["rows"]}
    for r in forced["rows"]:
        assert r == first[r["model"], r["precision"]]


def test_precision_names_are_quantize_py_names():
    assert all(ev.QC.quant_name(q) == p for p, q in ev.PRECISIONS.items() if q is not None)


def test_a_method_made_with_other_settings_runs_again(study, tmp_path):
    shutil.copytree(study.out, tmp_path / "out")
    argv = study_argv(tmp_path / "out", tmp_path / "fig", "fp32") + ["--methods", "ga"]
    res = ev.main(argv + ["--unlearn_args", "--steps 3"])
    assert set(res["meta"]["seconds"]["methods"]) == {"ga"}
    assert json.loads((tmp_path / "out" / "ga.json").read_text())["steps"] == 3
    assert "methods" not in ev.main(argv + ["--unlearn_args", "--steps 3"])["meta"]["seconds"]
    with pytest.raises(SystemExit, match="--dtype float16: use float32 or bfloat16"):
        ev.main(argv + ["--dtype", "float16"])
