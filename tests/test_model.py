"""model.py: shapes, greedy decoding with a KV cache, scores, perplexity, checkpoints, Hugging Face weights."""
import os

import pytest
import torch

from data.prepare import Seqs
from model import GPT, GPTConfig, greedy, load_checkpoint, perplexity, score
from settings import atomic_write_bytes, save_checkpoint


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


def test_greedy_with_cache_equals_greedy_without():
    """Lock-step decoding of prompts of unequal length, with a KV cache, against the plain loop: argmax of the
    whole sequence so far, one token at a time, prompt by prompt."""
    model = small_gpt()
    prompts = [[1, 2, 3, 4, 5], [7], [9, 8, 7]]
    for prompt, got in zip(prompts, greedy(model, prompts, [12, 3, 20])):
        slow = torch.tensor([prompt])
        for _ in range(len(got)):
            slow = torch.cat([slow, model(slow)[0][:, -1].argmax(-1, keepdim=True)], 1)
        assert got == slow[0, len(prompt):].tolist()


def test_exact_match_is_greedy_reproduction():
    model = small_gpt()
    start = torch.randint(50, (4, 6))
    out = torch.cat([start, torch.tensor(greedy(model, start.tolist(), [10] * 4))], 1)  # the model's own text
    out[2, 12] = (out[2, 12] + 1) % 50  # one wrong token in the continuation of sequence 2
    seqs = Seqs(out, torch.full((4,), 16), torch.full((4,), 6), torch.zeros(4), ["book"] * 4, [""] * 4)
    s = score(model, seqs)
    assert s["exact"].tolist() == [True, True, False, True]
    assert s["ma"][0] > s["ma"][2]
    logits = model(out)[0]
    manual = torch.log_softmax(logits[0, :-1], -1).gather(-1, out[0, 1:, None]).sum()
    assert torch.allclose(s["logprob"][0], manual, atol=1e-4)


def test_perplexity_is_the_exp_of_the_mean_next_token_cross_entropy():
    model = small_gpt()
    stream = torch.randint(50, (100,))  # windows of block_size = 32 inputs: 3 of them, 96 predictions
    x, y = stream[:96].view(3, 32), stream[1:97].view(3, 32)
    ce = torch.nn.functional.cross_entropy(model(x)[0].flatten(0, 1), y.flatten())
    assert perplexity(model, stream) == pytest.approx(ce.exp().item(), rel=1e-5)


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    model = small_gpt()
    save_checkpoint(tmp_path / "m.pt", model, kind="test", config={"lr": 0.1})
    loaded, ckpt = load_checkpoint(tmp_path / "m.pt")
    assert ckpt["kind"] == "test" and ckpt["config"] == {"lr": 0.1}
    idx = torch.randint(50, (2, 7))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert torch.load(tmp_path / "m.pt", weights_only=True)["model_args"]["n_embd"] == 16


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(SystemExit, match="missing.pt.*python train.py"):
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


def test_from_pretrained_matches_hugging_face_gpt2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=80, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(tmp_path)
    ours = GPT.from_pretrained(tmp_path).eval()
    idx = torch.randint(80, (2, 12))
    with torch.no_grad():
        assert torch.allclose(ours(idx)[0], hf(idx).logits, atol=1e-5)
