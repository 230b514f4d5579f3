"""model.py: shapes, greedy decoding with a KV cache, scores, checkpoints, settings, and the tiny target."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_configs
from data.prepare import atomic_write_bytes, load_data
from model import GPT, GPTConfig, TrainConfig, cli, load_checkpoint, save_checkpoint, score, train

ROOT = Path(__file__).resolve().parent.parent


def small_gpt(**kw):
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16, **kw)).eval()


def test_forward_shapes_and_ignored_targets():
    model = small_gpt()
    idx = torch.randint(50, (3, 10))
    logits, loss = model(idx)
    assert logits.shape == (3, 10, 50) and loss is None
    targets = idx.clone()
    targets[:, 5:] = -1
    _, loss = model(idx, targets)
    _, loss_half = model(idx[:, :5], targets[:, :5])
    assert torch.allclose(loss, loss_half)  # positions with target -1 do not count
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


def test_generate_with_cache_equals_greedy_without():
    model = small_gpt()
    idx = torch.randint(50, (2, 5))
    slow = idx
    for _ in range(12):
        slow = torch.cat([slow, model(slow)[0][:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(model.generate(idx, 12), slow)


def test_exact_match_is_greedy_reproduction():
    model = small_gpt()
    out = model.generate(torch.randint(50, (4, 6)), 10)  # the model's own greedy continuations
    out[2, 12] = (out[2, 12] + 1) % 50  # one wrong token in the continuation of sequence 2
    from data.prepare import Seqs
    seqs = Seqs(out, torch.full((4,), 16), torch.full((4,), 6), torch.zeros(4), ["book"] * 4, [""] * 4)
    s = score(model, seqs)
    assert s["exact"].tolist() == [True, True, False, True]
    assert s["ma"][0] > s["ma"][2]
    logits = model(out)[0]
    manual = torch.log_softmax(logits[0, :-1], -1).gather(-1, out[0, 1:, None]).sum()
    assert torch.allclose(s["logprob"][0], manual, atol=1e-4)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = small_gpt()
    save_checkpoint(tmp_path / "m.pt", model, kind="test", config={"lr": 0.1})
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["kind"] == "test" and ckpt["config"] == {"lr": 0.1}
    idx = torch.randint(50, (2, 7))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert torch.load(tmp_path / "m.pt", weights_only=True)["model_args"]["n_embd"] == 16


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(SystemExit, match="missing.pt.*python model.py"):
        load_checkpoint(tmp_path / "missing.pt")
    save_checkpoint(tmp_path / "m.pt", small_gpt())
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")
    torch.save({"weights": [1, 2, 3]}, tmp_path / "foreign.pt")
    with pytest.raises(SystemExit, match="foreign.pt"):
        load_checkpoint(tmp_path / "foreign.pt")


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def interrupted(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_bytes(tmp_path / "x.pt", b"data")
    assert list(tmp_path.iterdir()) == []


def test_settings_are_typed_and_unknown_ones_refused(capsys):
    (cfg,) = cli("doc", TrainConfig, argv=["--tune_lr", "0.01", "--force"])
    assert cfg.tune_lr == 0.01 and cfg.force is True
    with pytest.raises(SystemExit):
        cli("doc", TrainConfig, argv=["--tune_rate", "0.01"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --tune_rate" in err and "--tune_lr" in err  # the usage lists the valid ones
    with pytest.raises(SystemExit):
        cli("doc", TrainConfig, argv=["--base_steps", "many"])
    assert "invalid int value" in capsys.readouterr().err


def test_help_lists_every_setting_with_its_comment(capsys):
    from data.prepare import DataConfig
    with pytest.raises(SystemExit) as e:
        cli("doc", TrainConfig, DataConfig, argv=["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--general_tokens" in out and "95% train" in out and "--tune_lr" in out


def test_training_repeats_exactly_and_pure_bf16_stays_bf16(tmp_path):
    cfg, dcfg = tiny_configs(tmp_path)
    data = load_data(dcfg, tmp_path)
    runs = []
    for dtype in (torch.float32, torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=64, vocab_size=data.vocab_size, n_layer=1, n_head=2, n_embd=32)).to(dtype)
        train(model, data, cfg, 1e-3, torch.Generator().manual_seed(0), "t", memorize=("retain",), steps=5)
        runs.append(model.state_dict())
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    assert all(v.dtype == torch.bfloat16 for v in runs[2].values())  # no float32 master copy


def test_retrain_is_the_target_recipe_without_the_forget_set(tiny, tmp_path):
    """Each forget and retain sequence is in exactly `reps` of the target's batches; the retrain model sees every
    retain sequence as often, the forget set never, and as many general windows."""
    data = load_data(tiny.dcfg, tiny.out_dir)
    target, retrain = tiny.summary["target"]["exposures"], tiny.summary["retrain"]["exposures"]
    for split in ("forget", "retain"):
        assert target[split] == data.split(split).reps.tolist()
    assert retrain["retain"] == data.split("retain").reps.tolist() and set(retrain["forget"]) == {0}
    assert retrain["general_windows"] == target["general_windows"] > 0
    assert json.loads((tiny.out_dir / "train.json").read_text())["retrain"]["exposures"] == retrain


def test_no_measurement_feeds_a_position_training_never_fed(tiny):
    """Training feeds seq_len - 1 tokens (a sequence's last token is only a target), so that is the block size:
    every window a measurement feeds (perplexity, GPTQ calibration, output error) has at most that many."""
    model, _ = load_checkpoint(tiny.out_dir / "target.pt")
    assert model.config.block_size == tiny.dcfg.seq_len - 1
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, tiny.dcfg.seq_len, dtype=torch.long))


@pytest.mark.parametrize("argv, message", [
    (["--steps", "-3"], "--steps -3: must be >= 0"), (["--lr", "0"], "--lr 0.0: must be > 0"),
    (["--batch_size", "0"], "--batch_size 0: must be >= 1"), (["--sure_gamma", "120"], "must be in [0, 100]"),
    (["--alpha", "-1"], "--alpha -1.0: must be >= 0"), (["--sga_gamma", "2"], "--sga_gamma 2.0: must be in [0, 1]")])
def test_out_of_range_settings_are_refused_with_the_range(argv, message, capsys):
    import unlearn_ga
    with pytest.raises(SystemExit) as e:
        cli("doc", unlearn_ga.UnlearnConfig, unlearn_ga.RetainConfig, unlearn_ga.SGAConfig, argv=argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_every_settings_class_checks_its_ranges(capsys):
    from data.prepare import DataConfig
    from quantize import QuantConfig
    from evaluate import StudyConfig
    from unlearn_memflex import MemFlexConfig
    from unlearn_npo import NPOConfig
    from task_arithmetic import TAConfig
    for cls, argv, message in [(TrainConfig, ["--mem_frac", "1.0"], "one general window"),
                               (TrainConfig, ["--n_embd", "30"], "multiple of --n_head"),
                               (DataConfig, ["--book_prefix", "48"], "below --seq_len"),
                               (DataConfig, ["--secret_reps", "1,x"], "comma list"),
                               (QuantConfig, ["--nsamples", "0"], "--nsamples 0: must be >= 1"),
                               (QuantConfig, ["--method", "awq"], "rtn, gptq, nf4, fp4"),
                               (QuantConfig, ["--absmax", "--no-sym"], "symmetric integer grid"),
                               (StudyConfig, ["--workers", "-1"], "--workers -1: must be >= 0"),
                               (MemFlexConfig, ["--randomize", "1.5"], "in [0, 1]"),
                               (NPOConfig, ["--beta", "0"], "--beta 0.0: must be > 0"),
                               (TAConfig, ["--phi", "-0.1"], "in [0, 1]")]:
        with pytest.raises(SystemExit):
            cli("doc", cls, argv=argv)
        assert message in capsys.readouterr().err, (cls.__name__, argv)


@pytest.mark.parametrize("cmd, message", [(["quantize.py", "--method", "gptq", "--nsamples", "0"], "must be >= 1"),
                                          (["unlearn_ga.py", "--steps", "-3"], "--steps -3: must be >= 0")])
def test_bad_command_lines_end_in_a_message_not_a_traceback(tmp_path, cmd, message):
    r = subprocess.run([sys.executable, *cmd, "--out_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_tiny_target_memorizes_and_retrain_does_not(tiny):
    target, retrain = tiny.summary["target"], tiny.summary["retrain"]
    for kind in ("book", "facts"):
        assert target["by_kind"][kind]["forget_exact"] >= 0.75
        assert target["by_kind"][kind]["retain_exact"] >= 0.75
    assert retrain["retain_ma"] > retrain["forget_ma"] + 0.2
    assert abs(retrain["forget_ma"] - retrain["holdout_ma"]) < 0.1
    assert (tiny.out_dir / "train.json").exists() and (tiny.out_dir / "target.pt").exists()


def test_from_pretrained_matches_hugging_face_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=80, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(80, (2, 12))
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], hf(idx).logits, atol=1e-5)
