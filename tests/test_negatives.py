"""Offline negatives (Residual EBM, Sec. 4.1): sharded, deterministic, resumable, DDP-invariant.

Also the worker of the 2-process test: ``torchrun --nproc_per_node=2 tests/test_negatives.py OUT``
(or plainly for one process) writes the negatives of the module's tiny model into OUT.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import seqebm.data.negatives as negmod
from seqebm.data.negatives import (
    MANIFEST_NAME,
    NegativeStore,
    generate_negatives,
    shard_file_name,
    shard_seed,
)
from seqebm.models.rnn import RNNLM
from seqebm.models.transformer import TransformerLM
from seqebm.sampling.sampler import enumerate_proposal, sample

V, EOS, PAD = 8, 2, 0
KW = dict(num_per_prefix=4, max_new_tokens=5, top_k=5, eos_id=EOS, shard_size=3, seed=7, progress=False)


def tiny_model(kind: str = "transformer", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "rnn":
        return RNNLM(V, d_model=16, n_layers=1, dropout=0.0, cell="gru")
    return TransformerLM(V, d_model=16, n_layers=1, n_heads=2, max_len=16, dropout=0.0)


def tiny_prefixes(n: int = 8, p: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    x = torch.randint(3, V, (n, p), generator=g)
    x[:, 0] = 1  # BOS
    return x


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def load_shard(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One finished run of the default settings: (out_dir, its files' bytes)."""
    out = tmp_path_factory.mktemp("ref")
    generate_negatives(tiny_model(), tiny_prefixes(), out, **KW)
    return out, files(out)


def test_layout_shapes_and_manifest(reference):
    out, _ = reference
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["format"] == "seqebm-negatives-1"
    assert (manifest["num_prefixes"], manifest["prefix_len"], manifest["num_shards"]) == (8, 3, 3)  # 3 + 3 + 2
    assert [s["file"] for s in manifest["shards"]] == [shard_file_name(s) for s in range(3)]
    for s, count in enumerate((3, 3, 2)):
        t = load_shard(out / shard_file_name(s))
        assert t["prefix_index"].dtype == torch.int64
        assert t["prefix_index"].tolist() == list(range(3 * s, 3 * s + count))
        assert t["tokens"].dtype == torch.int32 and t["tokens"].shape == (count, 4, 5)
        assert t["lengths"].dtype == torch.int32 and t["lengths"].shape == (count, 4)
        assert t["log_q"].dtype == t["log_p"].dtype == torch.float32 and t["log_q"].shape == (count, 4)
        # top-k proposal is sharper than the model: q >= p on the sampled tokens, and both <= 0
        assert (t["log_q"] <= 0).all() and (t["log_q"] >= t["log_p"] - 1e-5).all()
    from safetensors import safe_open

    with safe_open(str(out / shard_file_name(1)), framework="pt") as f:
        meta = json.loads(f.metadata()["negatives"])
    assert meta["shard"] == 1 and meta["seed"] == 7 and meta["shard_seed"] == shard_seed(7, 1)
    assert meta["sampling"] == {"top_k": 5, "top_p": None, "temperature": 1.0, "eos_id": EOS, "pad_id": PAD}
    assert meta["fingerprint"] == manifest["fingerprint"] and meta["num_per_prefix"] == 4
    store = NegativeStore(out)
    assert (len(store), store.num_prefixes, store.num_per_prefix, store.max_new_tokens) == (8, 8, 4, 5)
    tok, lengths, log_q, log_p = store.all_for(torch.tensor([7, 0, 4]), with_log_p=True)
    assert tok.shape == (3, 4, 5) and tok.dtype == torch.long and lengths.shape == log_q.shape == log_p.shape == (3, 4)
    assert torch.equal(tok[0], load_shard(out / shard_file_name(2))["tokens"][1].long())


@pytest.mark.parametrize("kind", ["transformer", "rnn"])
def test_shard_equals_sampler_output_for_its_generator(tmp_path, kind):
    """Shard s is exactly ``sample(prefixes of s, generator=manual_seed(shard_seed(seed, s)))``."""
    model, prefixes = tiny_model(kind), tiny_prefixes()
    generate_negatives(model, prefixes, tmp_path, **KW)
    for s, (start, count) in enumerate(((0, 3), (3, 3), (6, 2))):
        ref = sample(model, prefixes[start:start + count], max_new_tokens=5, num_samples=4, top_k=5, eos_id=EOS,
                     generator=torch.Generator().manual_seed(shard_seed(7, s)))
        t = load_shard(tmp_path / shard_file_name(s))
        assert torch.equal(t["tokens"].long(), ref.tokens.view(count, 4, 5))
        assert torch.equal(t["lengths"].long(), ref.lengths.view(count, 4))
        assert torch.equal(t["log_q"], ref.log_q.float().view(count, 4))
        assert torch.equal(t["log_p"], ref.log_p.float().view(count, 4))


def test_eos_lengths_and_log_probs_against_brute_force(tmp_path):
    """Pad after EOS, length counts EOS; log q equals the enumerated top-k proposal and log p
    equals the teacher-forced model log-prob of the generated tokens (independent oracles)."""
    model, prefixes = tiny_model(), tiny_prefixes(4)
    store = generate_negatives(model, prefixes, tmp_path, num_per_prefix=16, max_new_tokens=3, top_k=3,
                               eos_id=EOS, pad_id=PAD, shard_size=4, progress=False)
    tok, lengths, log_q, log_p = store.all_for(torch.arange(4), with_log_p=True)
    ended = lengths < 3
    assert ended.any() and (~ended).any()  # both cases occur with this seed
    seen_eos = 0
    for i in range(4):
        oracle = enumerate_proposal(model, prefixes[i:i + 1], 3, top_k=3, eos_id=EOS)
        for j in range(16):
            n = int(lengths[i, j])
            seq = tok[i, j, :n].tolist()
            assert EOS not in seq[:-1] and (n == 3 or seq[-1] == EOS)
            assert (tok[i, j, n:] == PAD).all()
            seen_eos += n < 3
            assert math.isclose(float(log_q[i, j]), oracle[tuple(seq)], abs_tol=1e-4)
            full = torch.cat([prefixes[i], tok[i, j, :n]])[None]
            with torch.no_grad():
                logits = model(full[:, :-1]).double()
            lp = torch.log_softmax(logits, -1)[0, -n:].gather(1, full[0, -n:, None]).sum()
            assert math.isclose(float(log_p[i, j]), float(lp), abs_tol=1e-4)
    assert seen_eos > 0


def test_deterministic_across_runs_and_batch_chunking(tmp_path, reference):
    _, ref_files = reference
    generate_negatives(tiny_model(), tiny_prefixes(), tmp_path / "again", **KW)
    assert files(tmp_path / "again") == ref_files  # byte-for-byte, manifest included
    chunked = generate_negatives(tiny_model(), tiny_prefixes(), tmp_path / "chunked", max_batch_tokens=16,
                                 **KW)  # 2 rows per sampler chunk: same samples
    ref = NegativeStore(reference[0])
    a, b = chunked.all_for(torch.arange(8), with_log_p=True), ref.all_for(torch.arange(8), with_log_p=True)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    torch.testing.assert_close(a[2], b[2], atol=1e-5, rtol=0)
    other_seed = generate_negatives(tiny_model(), tiny_prefixes(), tmp_path / "seed8", **dict(KW, seed=8))
    assert not torch.equal(other_seed.all_for(torch.arange(8))[0], b[0])


def test_model_mode_restored_and_dropout_off(tmp_path, reference):
    torch.manual_seed(0)
    model = TransformerLM(V, d_model=16, n_layers=1, n_heads=2, max_len=16, dropout=0.5)  # same weights
    model.train()
    generate_negatives(model, tiny_prefixes(), tmp_path, **KW)
    assert model.training
    ref = NegativeStore(reference[0]).all_for(torch.arange(8))
    assert torch.equal(NegativeStore(tmp_path).all_for(torch.arange(8))[0], ref[0])  # sampled in eval mode


class CountingSampler:
    """Wraps ``sample``; raises after ``crash_after`` calls (a run killed midway)."""

    def __init__(self, crash_after: int | None = None):
        self.calls, self.crash_after = 0, crash_after

    def __call__(self, *args, **kwargs):
        if self.crash_after is not None and self.calls >= self.crash_after:
            raise KeyboardInterrupt("simulated kill")
        self.calls += 1
        return sample(*args, **kwargs)


def test_resume_regenerates_only_a_deleted_shard(tmp_path, reference, monkeypatch):
    out, ref_files = reference
    for name, data in ref_files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / shard_file_name(1)).unlink()
    (tmp_path / MANIFEST_NAME).unlink()
    spy = CountingSampler()
    monkeypatch.setattr(negmod, "sample", spy)
    generate_negatives(tiny_model(), tiny_prefixes(), tmp_path, **KW)
    assert spy.calls == 1
    assert files(tmp_path) == ref_files


def test_resume_after_crash_with_partial_tmp_file(tmp_path, reference, monkeypatch):
    _, ref_files = reference
    monkeypatch.setattr(negmod, "sample", CountingSampler(crash_after=1))
    with pytest.raises(KeyboardInterrupt):
        generate_negatives(tiny_model(), tiny_prefixes(), tmp_path, **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == [shard_file_name(0)]  # no manifest, no partial file
    (tmp_path / f".{shard_file_name(1)}.x1y2.tmp").write_bytes(b"half a shard")  # a kill during the write
    with pytest.raises(FileNotFoundError, match="not a finished negatives directory"):
        NegativeStore(tmp_path)
    spy = CountingSampler()
    monkeypatch.setattr(negmod, "sample", spy)
    generate_negatives(tiny_model(), tiny_prefixes(), tmp_path, **KW)
    assert spy.calls == 2  # shards 1 and 2
    assert files(tmp_path) == ref_files  # and the stale tmp file is gone


def test_other_run_in_out_dir_is_an_error(tmp_path, reference, monkeypatch):
    """Detected before anything is sampled, from the manifest or (unfinished run) from the shards."""
    out, ref_files = reference
    spy = CountingSampler()
    monkeypatch.setattr(negmod, "sample", spy)

    def fresh(keep_manifest=True):
        d = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        for name, data in ref_files.items():
            if keep_manifest or name not in (MANIFEST_NAME, shard_file_name(2)):
                (d / name).write_bytes(data)
        return d

    for keep in (True, False):  # caught by the manifest, and by the shards alone
        with pytest.raises(ValueError, match="different run.*use another out_dir"):
            generate_negatives(tiny_model(), tiny_prefixes(), fresh(keep), **dict(KW, seed=8))
        with pytest.raises(ValueError, match="different run"):
            generate_negatives(tiny_model(seed=1), tiny_prefixes(), fresh(keep), **KW)
        with pytest.raises(ValueError, match="different run"):
            generate_negatives(tiny_model(), tiny_prefixes() % 7, fresh(keep), **KW)
        with pytest.raises(ValueError, match="different run"):
            generate_negatives(tiny_model(), tiny_prefixes(), fresh(keep), **dict(KW, top_k=4))
    with pytest.raises(ValueError, match="not a shard of this run"):  # 3 prefixes, 1 shard: shard 1 is foreign
        generate_negatives(tiny_model(), tiny_prefixes()[:3], fresh(False), **KW)
    assert spy.calls == 0


def test_corrupt_shard_is_an_error(tmp_path, reference):
    _, ref_files = reference
    name = shard_file_name(1)
    data = ref_files[name]
    for i, bad in enumerate((data[: len(data) // 2], data[:-3] + bytes([data[-3] ^ 1]) + data[-2:], b"junk")):
        d = tmp_path / f"d{i}"
        d.mkdir()
        (d / name).write_bytes(bad)
        with pytest.raises(ValueError, match="corrupt"):
            generate_negatives(tiny_model(), tiny_prefixes(), d, **KW)
    # a reader notices too (shards are checked when first loaded)
    d = tmp_path / "store"
    d.mkdir()
    for n, b in ref_files.items():
        (d / n).write_bytes(b)
    (d / name).write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    store = NegativeStore(d)
    store.get(torch.tensor([0]))
    with pytest.raises(ValueError, match="content hash"):
        store.get(torch.tensor([4]))


def test_get_draws_uniformly_among_a_prefix_negatives(tmp_path):
    """Each of the K = 4 negatives of a prefix is drawn with probability 1/4 (Sec. 4.1).

    For 3 prefixes (in different shards) x 2000 draws the counts per (prefix, negative) are
    multinomial(2000, 1/4); Pearson's statistic is chi-square with 3 dof per prefix, 9 in all,
    whose 1e-4 upper quantile is 33.7. The negatives are made distinct (large vocab, no top-k)
    so that every draw identifies its negative.
    """
    torch.manual_seed(0)
    model = TransformerLM(64, d_model=16, n_layers=1, n_heads=2, max_len=16, dropout=0.0)
    prefixes = torch.ones(6, 2, dtype=torch.long)
    store = generate_negatives(model, prefixes, tmp_path, num_per_prefix=4, max_new_tokens=6, shard_size=2,
                               progress=False)
    chosen = torch.tensor([0, 3, 5])
    negs = store.all_for(chosen)[0]  # (3, 4, 6)
    for i in range(3):
        assert len({tuple(r) for r in negs[i].tolist()}) == 4
    idx = chosen.repeat(2000)
    g = torch.Generator().manual_seed(1)
    tok, lengths, log_q = store.get(idx, g)
    assert tok.shape == (6000, 6) and lengths.shape == log_q.shape == (6000,)
    match = (tok[:, None, :] == negs.repeat(2000, 1, 1)).all(-1)  # (6000, 4): which negative was drawn
    assert (match.sum(1) == 1).all()
    which = match.float().argmax(1)
    all_q = store.all_for(chosen)[2].repeat(2000, 1)
    assert torch.equal(log_q, all_q.gather(1, which[:, None]).squeeze(1))  # fields stay aligned
    counts = torch.zeros(3, 4)
    counts.index_put_((torch.arange(6000) % 3, which), torch.ones(6000), accumulate=True)
    chi2 = float(((counts - 500) ** 2 / 500).sum())
    assert chi2 < 33.7, counts
    again = store.get(idx, torch.Generator().manual_seed(1))[0]
    assert torch.equal(again, tok)  # reproducible with the same generator


def test_store_cache_limit_and_index_validation(reference):
    out, _ = reference
    store = NegativeStore(out, max_cached_shards=1)
    full = NegativeStore(out).all_for(torch.arange(8))
    part = store.all_for(torch.tensor([7, 0, 3, 6, 1]))
    assert torch.equal(part[0], full[0][[7, 0, 3, 6, 1]]) and len(store._cache) == 1
    assert store.all_for(torch.tensor([], dtype=torch.long))[0].shape == (0, 4, 5)
    for bad, msg in ((torch.tensor([8]), r"\[0, 8\)"), (torch.tensor([-1]), r"\[0, 8\)"),
                     (torch.tensor([[0]]), "1-D integer"), (torch.tensor([0.0]), "1-D integer"), ([0], "1-D")):
        with pytest.raises(ValueError, match=msg):
            store.get(bad)
        with pytest.raises(ValueError, match=msg):
            store.all_for(bad)
    store.verify_prefixes(tiny_prefixes())
    with pytest.raises(ValueError, match="not the ones"):
        store.verify_prefixes(tiny_prefixes()[:4])


def test_argument_validation(tmp_path):
    m, x = tiny_model(), tiny_prefixes()
    cases = [((m, x.float()), {}, "LongTensor"), ((m, x[0]), {}, "LongTensor"),
             ((m, x), {"num_per_prefix": 0}, "num_per_prefix"), ((m, x), {"shard_size": 0}, "shard_size"),
             ((m, x), {"top_k": 0}, "top_k"), ((m, x), {"top_p": 1.5}, "top_p"),
             ((m, x), {"temperature": 0.0}, "temperature"), ((m, x), {"max_new_tokens": 15}, "max_len")]
    for args, over, msg in cases:
        with pytest.raises(ValueError, match=msg):
            generate_negatives(*args, tmp_path, **dict(KW, **over))


def test_progress_bar_on_main_rank(tmp_path, capsys):
    generate_negatives(tiny_model(), tiny_prefixes(), tmp_path, **dict(KW, progress=True))
    assert "negatives" in capsys.readouterr().err


def _run_worker(out: Path, nproc: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    launch = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone"] if nproc > 1 else []
    r = subprocess.run([sys.executable, *launch, __file__, str(out)], env=env, timeout=300, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.slow  # ~10 s: torchrun start-up
def test_two_processes_write_the_same_bytes_as_one(tmp_path, reference):
    """Rank r of 2 writes shards r, r + 2 (here 0, 2 and 1); the files, manifest included, equal
    those of a 1-process run under the same thread settings (bitwise equality across BLAS thread
    counts is not promised: a 2-thread matmul may round differently and change a draw)."""
    _run_worker(tmp_path / "one", 1)
    _run_worker(tmp_path / "two", 2)
    one, two = files(tmp_path / "one"), files(tmp_path / "two")
    assert sorted(two) == [MANIFEST_NAME] + [shard_file_name(s) for s in range(3)]
    assert two == one
    assert sorted(one) == sorted(reference[1])  # same layout as the in-process run


if __name__ == "__main__":  # worker of test_two_processes_write_the_same_bytes_as_one
    from seqebm.training.distributed import init_distributed

    torch.set_num_threads(1)
    info = init_distributed(torch.device("cpu"))
    store = generate_negatives(tiny_model(), tiny_prefixes(), sys.argv[1], dist=info, **KW)
    assert store.num_prefixes == 8
    if info.enabled:
        torch.distributed.destroy_process_group()
