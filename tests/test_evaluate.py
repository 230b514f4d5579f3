"""evaluate.py: the one-command study end to end on the tiny models of conftest.py, its caches and its refusals."""
import csv
import itertools
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest

import evaluate as ev
import report as R
import figures
from conftest import study_argv

ROW_KEYS = ("model", "precision", "verbmem_forget", "knowmem_forget", "knowmem_retain", "privleak", "forget_exact",
             "forget_ma", "holdout_ppl", "retain_exact", "retain_ma")  # what every results.json row holds
MODELS, PRECS = ["target", "retrain", "ga", "npo", "ga_gdr"], ["full", "rtn4"]


def test_study_writes_every_key_and_the_figures(study, tmp_path):
    res = json.loads((study.out / "results.json").read_text())
    assert res == study.results
    meta = res["meta"]
    assert meta["seed"] == 1337 and {"python", "torch"} <= set(meta["versions"])
    assert meta["corpora"]["book"] == "file book.txt"
    assert set(meta["seconds"]["methods"]) == {"ga", "npo", "ga_gdr"} and meta["rows_measured"] == 10
    assert meta["seconds"]["methods_and_rows"] >= sum(meta["seconds"]["methods"].values())  # one worker
    assert {"platform", "cpu_count", "device"} <= set(meta["machine"])
    rows = {(r["model"], r["precision"]): r for r in res["rows"]}
    assert list(rows) == list(itertools.product(MODELS, PRECS))
    for (m, p), r in rows.items():
        assert all(isinstance(r[k], (int, float)) for k in ROW_KEYS[2:]), (m, p)
        assert 0 <= r["verbmem_forget"] <= 100 and 0 <= r["forget_exact"] <= 1 and r["holdout_ppl"] > 1
        assert len(r["forget_ma_seq"]) == 16 and r["outliers_low"] + r["outliers_high"] <= 16
        assert (r["forget_el"] is None) == (p != "full")  # EL_n at full precision only
        assert ("mech_hist" in r) == (m in ("ga", "npo", "ga_gdr") and p == "rtn4")
    for p in PRECS:  # the references: retrain leaks 0 against itself, the target retains 100% of itself
        assert rows["retrain", p]["privleak"] == 0.0 and rows["target", p]["retained_verbmem_forget"] == 100.0
    assert sum(rows["ga", "rtn4"]["mech_hist"]) == pytest.approx(1.0)
    # the same numbers as the training and unlearning scripts measured on the same checkpoints
    assert rows["target", "full"]["forget_ma"] == pytest.approx(study.tiny.summary["target"]["forget_ma"])
    ga = json.loads((study.out / "ga.json").read_text())
    assert rows["ga", "full"]["forget_exact"] == pytest.approx(ga["forget_exact"])
    with open(study.out / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 10 and set(ROW_KEYS) <= set(table[0])
    for m in ("ga", "npo", "ga_gdr"):  # recovered at full precision is 0 where there is a gap to read
        share = rows[m, "full"]["recovered_verbmem_forget"]
        assert share == 0.0 or math.isnan(share)
    assert set(res["per_sequence"]) == set(PRECS[1:]) and list(res["per_sequence"]["rtn4"]) == ["ga_gdr"]
    groups = res["per_sequence"]["rtn4"]["ga_gdr"]
    assert sorted(sum((g["seqs"] for g in groups.values()), [])) == list(range(16))  # each sequence in one group
    assert groups["stayed"]["n"] == sum(a and b for a, b in zip(rows["ga_gdr", "full"]["forget_exact_seq"],
                                                                rows["ga_gdr", "rtn4"]["forget_exact_seq"]))
    pngs = sorted(study.fig.glob("*.png"))
    assert [p.name[0] for p in pngs] == list("12345")
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(p).shape[0] > 100
    # the figures are drawn from results.json alone
    assert [p.read_bytes() for p in figures.figures(res, tmp_path)] == [p.read_bytes() for p in pngs]


def test_report_prints_n_a_for_what_a_seed_could_not_read(study, capsys):
    res = json.loads(json.dumps(study.results))
    res["retained"]["rtn4"]["constrained"]["recovered_verbmem_forget"] = [None, None]  # nan at one seed, over seeds
    R.report(res)
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("rtn4") and "constrained" in ln][0]
    assert "n/a" in line


def test_per_sequence_groups_by_hand():
    row = lambda m, p, exact, ma: dict(model=m, precision=p, forget_exact_seq=exact, forget_ma_seq=ma)
    rows = [row("target", "full", [1, 1, 1, 1], [1.0, 0.9, 0.8, 0.7]), row("target", "rtn4", [1, 1, 1, 1], [1.0] * 4),
            row("ga_gdr", "full", [0, 1, 0, 1], [.2, .9, .4, .8]),
            row("ga_gdr", "rtn4", [1, 1, 0, 0], [.9, .9, .4, .1])]
    g = R.per_sequence(rows, ["full", "rtn4"])["rtn4"]["ga_gdr"]
    assert {k: v["seqs"] for k, v in g.items()} == dict(came_back=[0], stayed=[1], forgotten=[2], lost=[3])
    assert g["came_back"]["target_ma"] == 1.0 and g["came_back"]["unlearned_ma"] == pytest.approx(0.2)
    pooled = R.pooled_sequences([dict(per_sequence={"rtn4": {"ga_gdr": g}})] * 2)["rtn4"]["ga_gdr"]
    assert pooled["came_back"] == dict(n=2, target_ma=1.0, unlearned_ma=pytest.approx(0.2))


def test_law_points_by_hand():
    """Target 80 -> 40 VerbMem under rtn4, retrain 30 -> 20, ga 20 -> 10 with kept 0.5: at full precision ga
    retains 25% of the target (excess (20-30)/(80-30) = -20%); the law predicts 40 - 0.5 * 60 = 10, i.e. 25% of the
    quantized target, and an excess of (10-20)/(40-20) = -50%; measured 30: 75% retained, excess 50%."""
    row = lambda m, p, v, **kw: dict(model=m, precision=p, verbmem_forget=v, **kw)
    rows = [row("target", "full", 80.0), row("target", "rtn4", 40.0), row("retrain", "full", 30.0),
            row("retrain", "rtn4", 20.0), row("ga", "full", 20.0, retained_verbmem_forget=25.0,
                                              excess_verbmem_forget=-20.0),
            row("ga", "rtn4", 30.0, mech_kept=0.5, retained_verbmem_forget=75.0, excess_verbmem_forget=50.0)]
    (measured, law, null), = figures.law_points(dict(rows=rows))
    assert (measured, null) == (75.0, 25.0) and law == pytest.approx(25.0)
    (measured, law, null), = figures.law_points(dict(rows=rows), share="excess")
    assert (measured, null) == (50.0, -20.0) and law == pytest.approx(-50.0)


def test_figure8_puts_each_quantized_unlearned_row_beside_its_law(study, tmp_path):
    res = study.results
    pts = figures.law_points(res)
    by = {(r["model"], r["precision"]): r for r in res["rows"]}
    quantized = [r for r in res["rows"] if r.get("mech_kept") is not None and r["retained_verbmem_forget"] is not None]
    assert len(pts) == len(quantized) > 0
    for (measured, _, null), r in zip(pts, quantized):
        assert measured == r["retained_verbmem_forget"] and null == by[r["model"], "full"]["retained_verbmem_forget"]
    excess = figures.law_points(res, share="excess")
    defined = [r for r in quantized if None not in (r["excess_verbmem_forget"],
                                                     by[r["model"], "full"]["excess_verbmem_forget"])]
    assert len(excess) == len(defined)
    path, fit = figures.figure8({"tiny": res}, tmp_path)
    assert path.read_bytes()[:4] == b"\x89PNG" and fit["tiny"]["retained"][0] == len(pts)
    assert fit["tiny"].get("excess", (0,))[0] == len(excess)


def test_bad_names_are_refused_with_the_valid_list(tmp_path):
    with pytest.raises(SystemExit, match="unknown nope; the valid ones are ga,ga_gdr,ga_klr,npo"):
        ev.main(["--out_dir", str(tmp_path / "out"), "--methods", "ga,nope"])
    with pytest.raises(SystemExit, match="unknown int3; the valid ones are full,int8,rtn4,gptq4,nf4,fp4"):
        ev.main(["--out_dir", str(tmp_path / "out"), "--precisions", "full,int3"])
    assert not (tmp_path / "out").exists()


def test_second_run_reuses_cached_rows(study):
    stamps = {p: p.stat().st_mtime_ns for p in [*study.out.glob("rows/*.json"), *study.out.glob("*.pt")]}
    again = ev.main(study_argv(study.out, study.fig))
    assert again["rows"] == study.results["rows"] and again["meta"]["rows_measured"] == 0
    assert "methods" not in again["meta"]["seconds"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    # one more precision: only its rows are measured, in two worker processes
    more = ev.main(study_argv(study.out, study.fig, "full,rtn4,int8", workers=2))
    assert more["meta"]["rows_measured"] == 5
    assert [r for r in more["rows"] if r["precision"] != "int8"] == study.results["rows"]


def test_same_seed_same_numbers(study, tmp_path):
    shutil.copytree(study.out, tmp_path / "out")
    forced = ev.main(study_argv(tmp_path / "out", tmp_path / "fig", "full") + ["--methods", "ga", "--force"])
    assert forced["meta"]["rows_measured"] == 3 and set(forced["meta"]["seconds"]["methods"]) == {"ga"}
    first = {(r["model"], r["precision"]): r for r in study.results["rows"]}
    for r in forced["rows"]:
        assert r == first[r["model"], r["precision"]]


def test_precision_names_are_quantize_py_names():
    assert all(ev.QC.quant_name(q) == p for p, q in ev.PRECISIONS.items() if q is not None)


def test_a_method_made_with_other_settings_runs_again(study, tmp_path):
    shutil.copytree(study.out, tmp_path / "out")
    argv = study_argv(tmp_path / "out", tmp_path / "fig", "full") + ["--methods", "ga"]
    res = ev.main(argv + ["--unlearn_args", "--steps 3"])
    assert set(res["meta"]["seconds"]["methods"]) == {"ga"}
    assert json.loads((tmp_path / "out" / "ga.json").read_text())["steps"] == 3
    assert "methods" not in ev.main(argv + ["--unlearn_args", "--steps 3"])["meta"]["seconds"]
    with pytest.raises(SystemExit, match="--dtype float16: use float32 or bfloat16"):
        ev.main(argv + ["--dtype", "float16"])


def test_mean_sd_by_hand():
    assert R.mean_sd([1.0, 2.0, 6.0]) == [3.0, pytest.approx(2.6457513)]  # sample sd: sqrt((4 + 1 + 9) / 2)
    assert R.mean_sd([5.0]) == [5.0, 0.0] and R.mean_sd([1.0, None]) is None


@pytest.mark.parametrize("seeds", ["1,a", "1,,1", ""])
def test_bad_seeds_are_refused(seeds):
    with pytest.raises(SystemExit, match="comma list of distinct integer seeds"):
        ev.seed_list(seeds)


def test_caches_key_on_resolved_settings_and_the_environment(study):
    cfg = ev.cli(ev.__doc__, ev.StudyConfig, argv=study_argv(study.out, study.fig))[0]
    settings = ev.resolved(cfg, "ga_gdr")
    assert settings["retain"] == "gdr" and settings["lr"] == 3e-4 and settings["out_dir"] == str(study.out)
    spelled = ev.replace(cfg, unlearn_args="--lr 0.0003")  # another command line, the same run
    assert ev.resolved(spelled, "ga_gdr") == settings and ev.made(spelled, "ga_gdr") is not None
    assert ev.made(ev.replace(cfg, unlearn_args="--steps 41"), "ga_gdr") is None
    key = ev.row_key(cfg, "ga", "rtn4")["environment"]
    assert key["device"] == "cpu" and key["threads"] == ev.StudyConfig.job_threads == 1 and key["torch"] == ev.torch.__version__
    assert len(key["code"]) == 16
    row = json.loads((study.out / "rows" / "ga_rtn4.json").read_text())
    assert row["key"] == ev.row_key(cfg, "ga", "rtn4")


def children(pid):
    """The pids of the processes whose parent is pid (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def running(pid):
    """Whether the process exists and is not a zombie (Linux /proc)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process tree from /proc")
def test_sigterm_stops_the_workers_and_keeps_what_finished(tiny, tmp_path):
    shutil.copytree(tiny.out_dir, tmp_path / "out")
    argv = study_argv(tmp_path / "out", tmp_path / "fig", workers=2)
    p = subprocess.Popen([sys.executable, "evaluate.py", *argv], cwd=ev.Path(ev.__file__).parent,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # the threads the tiny models were trained with
    for line in p.stdout:  # the first finished stage
        if line.startswith("["):
            break
    workers = children(p.pid)
    assert workers, "the study runs its jobs in worker processes"
    p.send_signal(signal.SIGTERM)
    assert p.wait(timeout=60) != 0 and "stopped (SIGTERM)" in p.stderr.read()
    deadline = time.time() + 10  # multiprocessing's resource tracker (a child too) exits once the study's pipe closes
    while (alive := [w for w in workers if running(w)]) and time.time() < deadline:
        time.sleep(0.1)
    assert not alive, f"processes of the study still running: {alive}"
    out = tmp_path / "out"
    assert not list(out.rglob("*.tmp"))
    done = [*out.glob("runs/*.json"), *out.glob("rows/*.json")]
    assert done and all(json.loads(f.read_text()) for f in done)


def test_a_config_is_its_settings_then_the_command_lines_own(monkeypatch, tmp_path):
    seen = []
    (tmp_path / "probe.py").write_text('"""A probe."""\nmethods = "ga"\nseed = 7\nvary_data = True\n')
    monkeypatch.setattr(ev, "over_seeds", lambda cfg, argv: seen.append((cfg, argv)))
    ev.main([str(tmp_path / "probe.py"), "--seed", "8", "--seeds", "8,9"])
    cfg, argv = seen[0]
    assert (cfg.methods, cfg.seed, cfg.vary_data) == ("ga", 8, True)  # the command line wins over the config
    with pytest.raises(SystemExit, match="no such config file"):
        ev.main([str(tmp_path / "nope.py")])
    (tmp_path / "code.py").write_text("import os\n")
    with pytest.raises(SystemExit, match="line 1: a config holds only lines `name = value`"):
        ev.main([str(tmp_path / "code.py")])
    for path in sorted(ev.Path(ev.__file__).parent.glob("config/*.py")):  # every config names valid settings
        cfg = ev.cli(ev.__doc__, ev.StudyConfig, ev.durability.RelearnConfig, argv=[str(path)])[0]
        ev.names(cfg.methods, ev.METHODS, "methods") and ev.names(cfg.precisions, ev.PRECISIONS, "precisions")


def test_figures_refuses_a_missing_results_file(tmp_path):
    with pytest.raises(SystemExit, match="no results.json there; `python evaluate.py` writes"):
        figures.read_results(tmp_path)
    (tmp_path / "results.json").write_text('{"meta": {}}')
    assert figures.read_results(tmp_path) == figures.read_results(tmp_path / "results.json") == {"meta": {}}
