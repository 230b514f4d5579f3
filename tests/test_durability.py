"""durability.py: the UDS scores by hand, the relearning schedule, epochs that use every attack sequence once, attacks
that use exactly their data and steps, the card's R against the retrain model, and the card end to end in the tiny
study."""
import json
import math
import shutil
from collections import Counter

import pytest
import torch

import durability as D
import evaluate as ev
import unlearn_ga
from data.prepare import load_data
from model import load_checkpoint, score


def test_robustness_by_hand():
    assert D.robustness(30.0, 30.0) == 1.0 and D.robustness(0.0, 0.0) == 1.0  # unchanged
    assert D.robustness(0.0, 12.5) == 0.0 and D.robustness(12.5, 0.0) == 0.0  # one side 0
    assert D.robustness(10.0, 30.0) == pytest.approx(1 - 20 / 40)


def test_relearn_robustness_by_hand():
    # retrain 44 -> 42 (Δ_ret = -2), ga_gdr 52 -> 76 (Δ = +24): 1 - |24 + 2| / (24 + 2) = 0, where the before/after
    # form that ignores retrain gives 1 - 24 / 128 = 0.81
    assert D.relearn_robustness(76 - 52, 42 - 44) == 0.0 and D.robustness(52, 76) == pytest.approx(0.8125)
    assert D.relearn_robustness(24.0, 2.0) == pytest.approx(1 - 22 / 26) == D.relearn_robustness(2.0, 24.0)
    assert D.relearn_robustness(-2.0, -2.0) == 1.0 and D.relearn_robustness(0.0, 0.0) == 1.0  # alike; nothing moved
    assert D.relearn_robustness(3.0, 0.0) == 0.0 and D.relearn_robustness(0.5, -0.5) == 0.0  # one moves; apart


def test_the_card_scores_relearning_against_the_retrain_model():
    def curve(before, after, k_last):  # as read back from a cache: k as a string, "17" sorts before "2"
        return {str(k): dict(verbmem_forget=v) for k, v in ((0, before), (2, -1.0), (k_last, after))}
    curves = {"retrain": dict(forget_half=curve(44.0, 42.0, 9), retain=curve(44.0, 64.0, 17)),
              "ga_gdr": dict(forget_half=curve(52.0, 76.0, 9), retain=curve(50.0, 70.0, 17))}
    rows = [dict(model=m, precision=p, verbmem_forget=v) for m, p, v in (
        ("retrain", "full", 44.0), ("retrain", "rtn4", 40.0), ("ga_gdr", "full", 53.0), ("ga_gdr", "rtn4", 53.0))]
    card = D.card(rows, curves, ["rtn4"])
    assert card["retrain"]["R_forget_half"] == card["retrain"]["R_retain"] == 1.0  # by construction
    g = card["ga_gdr"]
    assert (g["verbmem_forget_half_before"], g["verbmem_forget_half_after"]) == (52.0, 76.0)
    assert g["R_forget_half"] == 0.0  # up 24 where retrain went down 2; the before/after form gives 0.81
    assert g["R_retain"] == 1.0 and D.robustness(50.0, 70.0) == pytest.approx(1 - 20 / 120)  # up 20, as retrain
    assert g["Q_rtn4"] == 1.0 and card["retrain"]["Q_rtn4"] == pytest.approx(1 - 4 / 84)


def test_schedule_is_a_log_scale_up_to_one_epoch():
    assert D.schedule(68, 8) == [0, 1, 2, 4, 8, 9]  # one epoch of 68 sequences at 8 a step: 9 steps
    assert D.schedule(8, 8) == [0, 1] and D.schedule(16, 8) == [0, 1, 2]


def test_an_epoch_is_every_sequence_once_in_a_seeded_order():
    gen = lambda seed: torch.Generator().manual_seed(seed)
    batches = D.epoch_batches(68, 68, 8, gen(0))  # the forget half of the study, 8 a step
    assert [len(b) for b in batches] == [8] * 8 + [4] and len(batches) == D.schedule(68, 8)[-1]
    assert sorted(torch.cat(batches).tolist()) == list(range(68))  # every sequence exactly once
    assert all(torch.equal(a, b) for a, b in zip(batches, D.epoch_batches(68, 68, 8, gen(0))))
    assert not torch.equal(torch.cat(batches), torch.cat(D.epoch_batches(68, 68, 8, gen(1))))
    windows = torch.cat(D.epoch_batches(791, 68, 8, gen(0))).tolist()  # general: 68 of 791 windows, none twice
    assert len(set(windows)) == 68 and set(windows) <= set(range(791))
    with pytest.raises(ValueError):
        D.epoch_batches(5, 6, 2, gen(0))


@pytest.mark.parametrize("attack", D.ATTACKS)
def test_an_attack_trains_on_exactly_its_data_for_one_epoch(tiny, monkeypatch, attack):
    model, ckpt = load_checkpoint(tiny.out_dir / "target.pt")
    data = load_data(ckpt["data"], tiny.out_dir)
    seen, windows, ce_loss, window_loss = [], [], D.ce_loss, D.window_loss

    def spy(m, seqs):
        seen.append(list(seqs.text))
        return ce_loss(m, seqs)

    def spy_windows(x):
        windows.extend(map(tuple, x.tolist()))
        return window_loss(x)
    monkeypatch.setattr(D, "ce_loss", spy)
    monkeypatch.setattr(D, "window_loss", spy_windows)
    cfg = D.RelearnConfig(relearn_batch=3)
    curve = D.relearn(model, data, attack, cfg, seed=5)
    attack_half, measured = D.halves(data, 5)
    n = D.epoch_size(attack, data, attack_half)
    assert sorted(curve, key=int) == D.schedule(n, 3) and not set(attack_half.text) & set(measured.text)
    if attack == "general":  # general windows go straight to the model, never through ce_loss
        T = data.config["seq_len"]
        corpus = set(map(tuple, data.general_train[:len(data.general_train) // T * T].view(-1, T).tolist()))
        assert seen == [] and n == len(attack_half) and len(set(windows)) == len(windows) == n
        assert set(windows) <= corpus  # non-overlapping windows, each at most once
    else:
        pool = attack_half if attack == "forget_half" else data.split("retain")
        assert windows == [] and len(seen) == math.ceil(n / 3) == D.schedule(n, 3)[-1] and n == len(pool)
        assert all(len(b) <= 3 for b in seen) and Counter(t for b in seen for t in b) == Counter(pool.text)


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
            "--precisions", "full,rtn4", "--workers", "1", "--durability", "--relearn_batch", "4"]
    res = ev.main(argv)
    dur = json.loads((tmp_path / "out" / "durability.json").read_text())
    assert dur == res["durability"] and set(dur["card"]) == {"target", "retrain", "ga", "npo", "ga_gdr"}

    def delta(name, attack):  # forget VerbMem after one epoch minus before, from the curves
        curve = dur["curves"][name][attack]
        ks = sorted(curve, key=int)
        return curve[ks[-1]]["verbmem_forget"] - curve[ks[0]]["verbmem_forget"]
    for name, row in dur["card"].items():
        assert {"Q_rtn4", "R_forget_half", "R_retain", "R_general"} <= set(row)
        fp = next(r for r in res["rows"] if r["model"] == name and r["precision"] == "full")["verbmem_forget"]
        assert row["verbmem_full"] == fp
        q = next(r for r in res["rows"] if r["model"] == name and r["precision"] == "rtn4")["verbmem_forget"]
        assert row["Q_rtn4"] == pytest.approx(D.robustness(fp, q))
        for a in D.ATTACKS:
            assert row[f"R_{a}"] == pytest.approx(D.relearn_robustness(delta(name, a), delta("retrain", a)))
    assert all(dur["card"]["retrain"][f"R_{a}"] == 1.0 for a in D.ATTACKS)
    assert (tmp_path / "out" / "durability.csv").read_text().startswith("model,")
    assert (tmp_path / "fig" / "7_durability.png").read_bytes()[:4] == b"\x89PNG"
    again = ev.main(argv)  # the attacks are cached on the checkpoints' hashes
    assert again["durability"] == res["durability"]
