"""study/lrmap.py on the tiny target: the snapshots are the shorter runs, and the map's cells and law read back."""
import json
import shutil

import pytest
import torch

import metrics
from settings import cpu_name
from study import lrmap
from unlearn import RetainConfig, UnlearnConfig, load_target, unlearn
from unlearn_ga import ga_loss


@pytest.fixture(scope="module")
def study_dir(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("lrmap")
    for name in ("target.pt", "retrain.pt"):
        shutil.copy(tiny.out_dir / name, out)
    shutil.copytree(tiny.out_dir / "data", out / "data")
    return out


def test_the_model_after_k_steps_of_a_longer_run_is_the_k_step_model(study_dir):
    """The map reads one run at several step counts: constant lr, and batches that do not depend on the steps."""
    def run(steps, pick=None):
        cfg = UnlearnConfig(out_dir=str(study_dir), dtype="bfloat16", lr=1e-3, steps=steps)
        model, data = load_target(cfg)
        return unlearn(model, data, ga_loss, cfg, RetainConfig(retain="gdr"), pick=pick)[0]
    pick, kept = lrmap.snapshots({2, 4})
    long = run(4, pick)
    assert sorted(kept) == [2, 4]
    for k, model in ((2, run(2)), (4, long)):
        assert all(torch.equal(a, b) for a, b in zip(kept[k].state_dict().values(), model.state_dict().values()))
    assert not all(torch.equal(a, b) for a, b in zip(kept[2].state_dict().values(), kept[4].state_dict().values()))


def test_map_cells_law_and_cache(study_dir, tmp_path, capsys):
    argv = ["--out_dir", str(study_dir), "--fig_dir", str(tmp_path), "--lrs", "1e-3", "--steps", "2,4",
            "--precisions", "full,rtn4", "--threads", "1"]
    lrmap.main(argv)
    res = json.loads((study_dir / "lrmap" / "ga_gdr_lr0.001.json").read_text())
    ref = json.loads((study_dir / "lrmap" / "reference.json").read_text())
    assert sorted(res["cells"]) == ["2", "4"] and res["stats"]["steps"] == 4
    cell, t = res["cells"]["4"], ref["target"]
    assert set(cell) == {"full", "rtn4"} and "kept" in cell["rtn4"] and "kept" not in cell["full"]
    got, pred = lrmap.law(cell, ref, "rtn4")
    ret = lambda p: cell[p]["forget_exact"] / t[p]["forget_exact"] * 100
    assert got == pytest.approx(ret("rtn4"))
    scale = t["full"]["forget_exact"] / t["rtn4"]["forget_exact"]
    assert pred == pytest.approx(100 - cell["rtn4"]["kept"] * (100 - ret("full")) * scale)
    assert pred == pytest.approx(metrics.predicted_retained(ret("full"), cell["rtn4"]["kept"], scale))
    assert (tmp_path / "10_lrmap.png").exists()
    whole = json.loads((study_dir / "lrmap" / "map.json").read_text())
    assert whole["runs"] == [res] and whole["reference"] == ref
    assert res["machine"] == ref["machine"] == cpu_name()  # where it was computed, not where it was read back
    printed = capsys.readouterr().out
    assert "| ga_gdr | 0.001 | 4 |" in printed
    mtime = (study_dir / "lrmap" / "ga_gdr_lr0.001.json").stat().st_mtime_ns
    lrmap.main(argv)  # everything read back: nothing is run again
    assert (study_dir / "lrmap" / "ga_gdr_lr0.001.json").stat().st_mtime_ns == mtime
    again = capsys.readouterr().out
    assert printed.endswith(again) and "read at" in printed and "read at" not in again


def test_bad_settings_are_refused(study_dir, tmp_path):
    with pytest.raises(SystemExit, match="start with full"):
        lrmap.main(["--out_dir", str(study_dir), "--precisions", "rtn4"])
    with pytest.raises(SystemExit, match="the map runs ga_gdr"):
        lrmap.main(["--out_dir", str(study_dir), "--methods", "npo_gdr", "--steps", "1", "--precisions", "full",
                    "--fig_dir", ""])
    with pytest.raises(SystemExit, match="run the study first"):
        lrmap.main(["--out_dir", str(tmp_path)])
