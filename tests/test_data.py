"""data/prepare.py: deterministic token files, disjoint splits, clear errors."""
import pytest

from pathlib import Path

from conftest import tiny_configs
from data.prepare import SPLITS, build, load_data, read_source


def test_same_seed_gives_byte_identical_token_files(tmp_path):
    _, dcfg = tiny_configs(tmp_path)
    load_data(dcfg, tmp_path / "a")
    load_data(dcfg, tmp_path / "b")
    for name in ("meta.json", "tokens.npy"):
        assert (tmp_path / "a" / "data" / name).read_bytes() == (tmp_path / "b" / "data" / name).read_bytes()
    dcfg.data_seed += 1
    load_data(dcfg, tmp_path / "c")
    assert (tmp_path / "a/data/tokens.npy").read_bytes() != (tmp_path / "c/data/tokens.npy").read_bytes()


def test_splits_are_disjoint_and_hold_every_kind(tmp_path):
    _, dcfg = tiny_configs(tmp_path)
    data = load_data(dcfg, tmp_path)
    texts = {s: set(data.split(s).text) for s in SPLITS}
    for a in SPLITS:
        assert set(data.split(a).kind) == {"secrets", "facts", "book"}
        for b in SPLITS:
            assert a == b or not texts[a] & texts[b]
    assert not {q["question"] for q in data.qa["forget"]} & {q["question"] for q in data.qa["holdout"]}
    forget = data.split("forget")
    secret_reps = {int(r) for r, k in zip(forget.reps, forget.kind) if k == "secrets"}
    assert secret_reps == {1, 192} and set(data.split("holdout").reps.tolist()) == {0}


def test_sequences_round_trip_through_the_compact_vocabulary(tmp_path):
    _, dcfg = tiny_configs(tmp_path)
    data = load_data(dcfg, tmp_path)
    seqs = data.split("retain")
    for i in range(len(seqs)):
        ids = seqs.x[i, :seqs.length[i]].tolist()
        assert data.decode(ids) == seqs.text[i] and data.encode(seqs.text[i]) == ids
    assert (seqs.x[~seqs.mask] == 0).all()  # padding is <|endoftext|>, compact id 0


def test_missing_book_is_named(tmp_path):
    _, dcfg = tiny_configs(tmp_path)
    dcfg.book = str(tmp_path / "no_such_book.txt")
    with pytest.raises(SystemExit, match="no_such_book.txt"):
        build(dcfg)


def test_no_book_runs_and_records_it(tmp_path, capsys):
    _, dcfg = tiny_configs(tmp_path)
    dcfg.book = "none"
    meta, _ = build(dcfg)
    assert "none" in meta["corpora"]["book"] and "NO BOOK" in capsys.readouterr().err
    assert {s["kind"] for s in meta["seqs"]} == {"secrets", "facts"}
    assert Path(dcfg.general).name in meta["corpora"]["general"]


def test_hf_source_reads_a_local_dataset_through_datasets(tmp_path):
    """--book hf:NAME goes through datasets.load_dataset(NAME, split=...): a local folder of text files is a dataset
    it reads offline (one row a line, field 'text'), so the call is checked without the network."""
    folder = tmp_path / "plays"
    folder.mkdir()
    (folder / "train.txt").write_text("To be, or not to be\nthat is the question\n", encoding="utf-8")
    text, description = read_source(f"hf:{folder}", "book")
    assert text == "To be, or not to be\n\nthat is the question" and "train" in description
