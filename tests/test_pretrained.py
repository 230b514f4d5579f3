"""pretrained.py: the quantizers on local Hugging Face causal LMs (tiny random GPT-2 and Llama, saved here)."""
import pytest
import torch

import model as M
import pretrained
import quantize as Q
import quantize_cli as QC
from conftest import prose


def tiny_hf(tmp_path, arch, with_tokenizer=True):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM,
                              PreTrainedTokenizerFast)
    text = prose(1200, 3)
    (tmp_path / "text.txt").write_text(text)
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator([text], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    V = tok.get_vocab_size()
    torch.manual_seed(0)
    if arch == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=2))
    else:
        hf = LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64))
    hf.save_pretrained(tmp_path / arch)
    if with_tokenizer:
        PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / arch)
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
    before, after = pretrained.quantize_hf(cfg)
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
    windows = Q.calibration_windows
    monkeypatch.setattr(Q, "calibration_windows", lambda stream, *a: seen.append(stream) or windows(stream, *a))
    pretrained.quantize_hf(QC.QuantConfig(hf=str(path), text=str(text), method="gptq", bits=4, nsamples=8,
                                         group_size=32))
    (calib,) = seen  # one stream of calibration windows: the first half; quantize_hf scores the second
    from transformers import AutoTokenizer
    ids = torch.tensor(AutoTokenizer.from_pretrained(path)(text.read_text())["input_ids"])
    assert torch.equal(calib, ids[:len(ids) // 2])


def test_hf_without_tokenizer_is_refused(tmp_path):
    path, text = tiny_hf(tmp_path, "gpt2", with_tokenizer=False)
    with pytest.raises(SystemExit, match="tokenizer"):
        pretrained.quantize_hf(QC.QuantConfig(hf=str(path), text=str(text), method="rtn"))
