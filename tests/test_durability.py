"""durability.py: the UDS scores by hand, the relearning schedule, attacks that use exactly their data and steps, and
the card end to end in the tiny study."""
import json
import shutil

import pytest

import durability as D
import evaluate as ev
import unlearn_ga
from data.prepare import load_data
from model import load_checkpoint, score


def test_robustness_by_hand():
    assert D.robustness(30.0, 30.0) == 1.0 and D.robustness(0.0, 0.0) == 1.0  # unchanged
    assert D.robustness(0.0, 12.5) == 0.0 and D.robustness(12.5, 0.0) == 0.0  # one side 0
    assert D.robustness(10.0, 30.0) == pytest.approx(1 - 20 / 40)


def test_schedule_is_a_log_scale_up_to_one_epoch():
    assert D.schedule(68, 8) == [0, 1, 2, 4, 8, 9]  # one epoch of 68 sequences at 8 a step: 9 steps
    assert D.schedule(8, 8) == [0, 1] and D.schedule(16, 8) == [0, 1, 2]


@pytest.mark.parametrize("attack", D.ATTACKS)
def test_an_attack_trains_on_exactly_its_data_for_one_epoch(tiny, monkeypatch, attack):
    model, ckpt = load_checkpoint(tiny.out_dir / "target.pt")
    data = load_data(ckpt["data"], tiny.out_dir)
    seen, ce_loss = [], D.ce_loss

    def spy(m, seqs):
        seen.append(list(seqs.text))
        return ce_loss(m, seqs)
    monkeypatch.setattr(D, "ce_loss", spy)
    cfg = D.RelearnConfig(relearn_batch=3)
    curve = D.relearn(model, data, attack, cfg, seed=5)
    attack_half, measured = D.halves(data, 5)
    assert sorted(curve, key=int) == D.schedule(len(attack_half), 3) and not set(attack_half.text) & set(measured.text)
    pool = {"forget_half": set(attack_half.text), "retain": set(data.split("retain").text), "general": set()}[attack]
    if attack == "general":  # general windows go straight to the model, never through ce_loss
        assert seen == []
    else:
        assert len(seen) == D.schedule(len(attack_half), 3)[-1] and all(len(b) == 3 and set(b) <= pool for b in seen)


def test_relearning_raises_the_forget_ma_of_an_unlearned_model(tiny, tmp_path):
    shutil.copy(tiny.out_dir / "target.pt", tmp_path)
    shutil.copytree(tiny.out_dir / "data", tmp_path / "data")
    unlearn_ga.main(["--out_dir", str(tmp_path), "--steps", "5", "--lr", "1e-3"])
    model, ckpt = load_checkpoint(tmp_path / "ga.pt")
    data = load_data(ckpt["data"], tmp_path)
    curve = D.relearn(model, data, "forget_half", D.RelearnConfig(relearn_lr=1e-3, relearn_batch=2), seed=0)
    ks = sorted(curve, key=int)
    _, measured = D.halves(data, 0)
    assert curve[ks[0]]["forget_ma"] == pytest.approx(score(model, measured)["ma"].mean().item())
    assert curve[ks[-1]]["forget_ma"] > curve[ks[0]]["forget_ma"] + 0.01


def test_the_study_writes_the_durability_card(study, tmp_path):
    shutil.copytree(study.out, tmp_path / "out")
    argv = ["--out_dir", str(tmp_path / "out"), "--fig_dir", str(tmp_path / "fig"), "--methods", "ga,npo,ga_gdr",
            "--precisions", "fp32,rtn4", "--workers", "1", "--durability", "--relearn_batch", "4"]
    res = ev.main(argv)
    dur = json.loads((tmp_path / "out" / "durability.json").read_text())
    assert dur == res["durability"] and set(dur["card"]) == {"target", "retrain", "ga", "npo", "ga_gdr"}
    for name, row in dur["card"].items():
        assert {"Q_rtn4", "R_forget_half", "R_retain", "R_general"} <= set(row)
        assert all(0 <= v <= 1 for k, v in row.items() if k[:2] in ("Q_", "R_"))
        fp = next(r for r in res["rows"] if r["model"] == name and r["precision"] == "fp32")["verbmem_forget"]
        assert row["verbmem_fp32"] == fp
    assert (tmp_path / "out" / "durability.csv").read_text().startswith("model,")
    assert (tmp_path / "fig" / "7_durability.png").read_bytes()[:4] == b"\x89PNG"
    again = ev.main(argv)  # the attacks are cached on the checkpoints' hashes
    assert again["durability"] == res["durability"]
