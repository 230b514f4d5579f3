"""train.py: exact repetition, the exposures of target and retrain, the positions measurements feed, memorization."""
import json

import pytest
import torch

from conftest import tiny_configs
from data.prepare import load_data
from model import GPT, GPTConfig, load_checkpoint
from train import train


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


def test_tiny_target_memorizes_and_retrain_does_not(tiny):
    target, retrain = tiny.summary["target"], tiny.summary["retrain"]
    for kind in ("book", "facts"):
        assert target["by_kind"][kind]["forget_exact"] >= 0.75
        assert target["by_kind"][kind]["retain_exact"] >= 0.75
    assert retrain["retain_ma"] > retrain["forget_ma"] + 0.2
    assert abs(retrain["forget_ma"] - retrain["holdout_ma"]) < 0.1
    assert (tiny.out_dir / "train.json").exists() and (tiny.out_dir / "target.pt").exists()
