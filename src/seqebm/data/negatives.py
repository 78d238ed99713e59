"""Offline negatives for residual-EBM training: K base-LM samples per prefix, sharded on disk.

Residual EBM, Sec. 3.1 and Sec. 4.1: the noise distribution of (conditional) NCE is the base
LM, and "for efficiency we generated 16/128 samples per prefix ... offline, and sample uniformly
from those samples at training time". :func:`generate_negatives` does the offline part;
:class:`NegativeStore` does the uniform draw at training time.

Notation: N prefixes, P prefix length, K = ``num_per_prefix`` negatives per prefix,
L = ``max_new_tokens``, S prefixes in a shard (``shard_size``, the last shard may be smaller).

On-disk layout of ``out_dir``::

    shard-00000.safetensors   prefix_index (S,) int64, tokens (S, K, L) int32 (pad_id after EOS),
    shard-00001.safetensors   lengths (S, K) int32 (EOS included), log_q (S, K) float32 (exact log
    ...                       proposal prob, top-k/top-p/temperature included), log_p (S, K)
                              float32 (raw LM log prob, temperature 1); metadata key "negatives"
                              holds a JSON object (format, shard, seed, knobs, N, P, fingerprint,
                              content_sha256)
    manifest.json             written last, by rank 0: settings, fingerprint, one entry per shard

Determinism: shard s is sampled with ``torch.Generator().manual_seed(shard_seed(seed, s))`` on
CPU, and the sampler gives every row its own random stream, so the content of a shard depends
only on (model, prefixes, knobs, seed, s) -- not on how many ranks ran or in which order. The
safetensors metadata is one JSON string with sorted keys (safetensors writes a multi-key metadata
map in a random order per process), so equal content means equal bytes.

Resumption: a shard already on disk with the same fingerprint is checked (content hash) and
skipped; one with another fingerprint, or a corrupt one, raises ``ValueError`` -- negatives of
different runs are never mixed. Shards are written atomically (temporary file + rename), so a
killed run leaves at most a hidden ``.shard-*.tmp`` file, which is ignored and later removed.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn
from tqdm.auto import tqdm

from seqebm.io import atomic_write_bytes, atomic_write_text
from seqebm.sampling.sampler import sample
from seqebm.training.distributed import DistInfo

NEGATIVES_FORMAT = "seqebm-negatives-1"
MANIFEST_NAME = "manifest.json"
_META_KEY = "negatives"
_TENSORS = {  # name -> (dtype, shape as a function of (S, K, L))
    "prefix_index": (torch.int64, lambda s, k, l: (s,)),
    "tokens": (torch.int32, lambda s, k, l: (s, k, l)),
    "lengths": (torch.int32, lambda s, k, l: (s, k)),
    "log_q": (torch.float32, lambda s, k, l: (s, k)),
    "log_p": (torch.float32, lambda s, k, l: (s, k)),
}


def shard_file_name(shard: int) -> str:
    return f"shard-{shard:05d}.safetensors"


def shard_seed(seed: int, shard: int) -> int:
    """Seed of shard ``shard``'s generator: a hash of (seed, shard), stable across processes."""
    digest = hashlib.sha256(f"{NEGATIVES_FORMAT}/{int(seed)}/{int(shard)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _hash_tensor(h: Any, name: str, t: Tensor) -> None:  # h: a hashlib object
    t = t.detach().cpu().contiguous().reshape(-1)
    h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(t.view(torch.uint8).numpy())  # buffer protocol: no copy


def model_sha256(model: nn.Module) -> str:
    """sha256 over the state_dict (names, dtypes, shapes, bytes), in state_dict order."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        _hash_tensor(h, name, t)
    return h.hexdigest()


def prefixes_sha256(prefixes: Tensor) -> str:
    h = hashlib.sha256()
    _hash_tensor(h, "prefixes", prefixes.long())
    return h.hexdigest()


def _content_sha256(tensors: dict[str, Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        _hash_tensor(h, name, tensors[name])
    return h.hexdigest()


def _fingerprint(model_hash: str, prefix_hash: str, knobs: dict[str, Any]) -> str:
    blob = json.dumps({"model": model_hash, "prefixes": prefix_hash, "knobs": knobs}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# --------------------------------------------------------------------------------------------
# Reading and checking shard files
# --------------------------------------------------------------------------------------------


def _read_header(path: Path) -> dict[str, Any]:
    """The shard's JSON metadata, from the safetensors header only (no tensor data read)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
        meta = json.loads(header["__metadata__"][_META_KEY])
        if not isinstance(meta, dict) or meta.get("format") != NEGATIVES_FORMAT:
            raise ValueError(f"format is {meta.get('format') if isinstance(meta, dict) else meta!r}, "
                             f"expected {NEGATIVES_FORMAT!r}")
        return meta
    except (OSError, struct.error, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path} is corrupt or not a seqebm negatives shard ({e}); delete it to "
                         f"regenerate it, or use another out_dir") from None


def _mismatch(path: Path, got: str, want: str) -> ValueError:
    return ValueError(f"{path} holds negatives of a different run (fingerprint {got[:16]}... != "
                      f"{want[:16]}...: another model, prefix set, seed or sampling settings); shards "
                      f"of different runs are never mixed, so use another out_dir (or empty this one)")


def _read_shard(path: Path, *, fingerprint: str, shard: int, start: int, count: int, k: int, length: int,
                content_sha256: str | None = None) -> dict[str, Tensor]:
    """Load a shard and check it completely: fingerprint, layout, shapes, dtypes, content hash."""
    meta = _read_header(path)
    if meta.get("fingerprint") != fingerprint:
        raise _mismatch(path, str(meta.get("fingerprint")), fingerprint)

    def corrupt(why: str) -> ValueError:
        return ValueError(f"{path} is corrupt ({why}); delete it to regenerate it, or use another out_dir")

    if meta.get("shard") != shard:
        raise corrupt(f"it says it is shard {meta.get('shard')}, expected shard {shard}")
    try:
        tensors = load_safetensors(path.read_bytes())
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise corrupt(str(e)) from None
    if set(tensors) != set(_TENSORS):
        raise corrupt(f"tensors {sorted(tensors)}, expected {sorted(_TENSORS)}")
    for name, (dtype, shape) in _TENSORS.items():
        t = tensors[name]
        if t.dtype != dtype or tuple(t.shape) != shape(count, k, length):
            raise corrupt(f"'{name}' is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape(count, k, length)}")
    if meta.get("content_sha256") != _content_sha256(tensors):
        raise corrupt("content hash mismatch")
    if content_sha256 is not None and content_sha256 != meta["content_sha256"]:
        raise corrupt("its content hash differs from the one in the manifest (regenerated after the manifest?)")
    if not torch.equal(tensors["prefix_index"], torch.arange(start, start + count)):
        raise corrupt(f"prefix_index is not {start}..{start + count - 1}")
    return tensors


# --------------------------------------------------------------------------------------------
# Collectives (no-ops in a single process)
# --------------------------------------------------------------------------------------------


def _resolve_dist(info: DistInfo | None) -> DistInfo:
    if info is not None:
        return info
    if tdist.is_available() and tdist.is_initialized():
        return DistInfo(tdist.get_rank(), tdist.get_world_size(), 0)
    return DistInfo()


def _collective_device() -> torch.device:
    if tdist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _any_rank(flag: bool, info: DistInfo) -> bool:
    if not info.enabled:
        return flag
    t = torch.tensor([int(flag)], device=_collective_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def _ranks_agree(hex_digest: str, info: DistInfo) -> bool:
    if not info.enabled:
        return True
    t = torch.tensor(list(bytes.fromhex(hex_digest)), dtype=torch.int64, device=_collective_device())
    lo, hi = t.clone(), t.clone()
    tdist.all_reduce(lo, op=tdist.ReduceOp.MIN)
    tdist.all_reduce(hi, op=tdist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def _collective_raise(error: ValueError | None, info: DistInfo, what: str) -> None:
    """Raise on every rank when any rank failed, so no rank is left waiting at a barrier."""
    if _any_rank(error is not None, info):
        raise error if error is not None else ValueError(f"another rank failed while {what}; see its error")


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        tdist.barrier()


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


def _check_args(model: nn.Module, prefixes: Tensor, num_per_prefix: int, max_new_tokens: int,
                top_k: int | None, top_p: float | None, temperature: float, shard_size: int) -> None:
    if not isinstance(prefixes, Tensor) or prefixes.dim() != 2 or prefixes.shape[0] < 1 or prefixes.shape[1] < 1 \
            or prefixes.dtype != torch.long:
        got = f"{prefixes.dtype} {tuple(prefixes.shape)}" if isinstance(prefixes, Tensor) else type(prefixes).__name__
        raise ValueError(f"prefixes must be a non-empty (N, P>=1) LongTensor, got {got}")
    for name, v in (("num_per_prefix", num_per_prefix), ("max_new_tokens", max_new_tokens),
                    ("shard_size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or a positive int, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature!r}")
    max_len = getattr(model, "max_len", None)
    if max_len is not None and prefixes.shape[1] + max_new_tokens - 1 > max_len:
        raise ValueError(f"prefix length {prefixes.shape[1]} + max_new_tokens {max_new_tokens} exceeds the "
                         f"model's context max_len={max_len}")


def _model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def _sample_shard(model: nn.Module, prefixes: Tensor, start: int, *, seed: int, shard: int, k: int,
                  max_new_tokens: int, knobs: dict[str, Any], max_batch_tokens: int | None,
                  device: torch.device) -> dict[str, Tensor]:
    count = prefixes.shape[0]
    out = sample(model, prefixes.to(device), max_new_tokens=max_new_tokens, num_samples=k,
                 temperature=knobs["temperature"], top_k=knobs["top_k"], top_p=knobs["top_p"],
                 eos_id=knobs["eos_id"], pad_id=knobs["pad_id"],
                 generator=torch.Generator().manual_seed(shard_seed(seed, shard)),
                 max_batch_tokens=max_batch_tokens)
    # rows are grouped by prefix: row r continues prefix r // k
    return {
        "prefix_index": torch.arange(start, start + count, dtype=torch.int64),
        "tokens": out.tokens.to(torch.int32).reshape(count, k, max_new_tokens).cpu(),
        "lengths": out.lengths.to(torch.int32).reshape(count, k).cpu(),
        "log_q": out.log_q.float().reshape(count, k).cpu(),  # float64 sum of the per-token log q
        "log_p": out.log_p.float().reshape(count, k).cpu(),
    }


@torch.no_grad()
def generate_negatives(
    model: nn.Module,
    prefixes: Tensor,
    out_dir: str | Path,
    *,
    num_per_prefix: int,
    max_new_tokens: int,
    top_k: int | None = None,
    top_p: float | None = None,
    temperature: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    shard_size: int = 1024,
    seed: int = 0,
    max_batch_tokens: int | None = None,
    dist: DistInfo | None = None,
    progress: bool = True,
) -> "NegativeStore":
    """Sample ``num_per_prefix`` continuations of every prefix (N, P) from ``model`` into shards.

    Residual EBM, Sec. 4.1 (16 or 128 negatives per prefix, generated offline with top-k). Rank r
    of W writes shards r, r + W, r + 2W, ... of ``shard_size`` prefixes each; after a barrier,
    rank 0 writes ``manifest.json``. ``dist=None`` uses the initialised torch.distributed group
    if there is one, else a single process. ``out_dir`` must be shared by all ranks.

    Shard s holds ``tokens`` (S, K, L) int32, ``lengths`` (S, K), ``log_q`` / ``log_p`` (S, K)
    float32 (see the module docstring); it depends only on (model, prefixes, knobs, seed, s).
    Valid shards of an earlier run with the same fingerprint are kept (resumption); any other
    shard file raises ``ValueError``. ``max_batch_tokens`` bounds the sampler's chunk size and is
    not part of the fingerprint (it changes no sample, at most the last bits of float sums).
    The model is put in eval mode while sampling. Returns the :class:`NegativeStore`.
    """
    _check_args(model, prefixes, num_per_prefix, max_new_tokens, top_k, top_p, temperature, shard_size)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    info = _resolve_dist(dist)
    out_dir = Path(out_dir)
    n, p = prefixes.shape
    k, length = num_per_prefix, max_new_tokens
    num_shards = -(-n // shard_size)
    knobs = {"top_k": top_k, "top_p": None if top_p is None else float(top_p), "temperature": float(temperature),
             "eos_id": eos_id, "pad_id": int(pad_id)}
    model_hash, prefix_hash = model_sha256(model), prefixes_sha256(prefixes)
    settings = {"format": NEGATIVES_FORMAT, "num_prefixes": n, "prefix_len": p, "num_per_prefix": k,
                "max_new_tokens": length, "shard_size": shard_size, "num_shards": num_shards, "seed": seed,
                "sampling": knobs}
    fingerprint = _fingerprint(model_hash, prefix_hash, settings)
    if not _ranks_agree(fingerprint, info):
        raise ValueError("ranks disagree on the negatives fingerprint: every rank must pass the same model "
                         "weights, prefixes and settings (seed the model's initialisation or load a checkpoint)")

    def span(s: int) -> tuple[int, int]:
        return s * shard_size, min(shard_size, n - s * shard_size)

    # 1) check what is already there (every rank its own shards), then fail together or go on
    mine = list(range(info.rank, num_shards, info.world_size))
    todo: list[int] = []
    error: ValueError | None = None
    try:
        if info.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
        _check_existing_dir(out_dir, fingerprint, num_shards)
        for s in mine:
            path = out_dir / shard_file_name(s)
            if path.exists():
                start, count = span(s)
                _read_shard(path, fingerprint=fingerprint, shard=s, start=start, count=count, k=k, length=length)
            else:
                todo.append(s)
    except ValueError as e:
        error = e
    _collective_raise(error, info, "checking existing shards")

    # 2) sample the missing shards
    was_training = model.training
    model.eval()
    device = _model_device(model)
    bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="shard", disable=not (progress and info.is_main),
               desc="negatives" + (f" (rank 0 of {info.world_size})" if info.enabled else ""))
    try:
        for s in todo:
            start, count = span(s)
            tensors = _sample_shard(model, prefixes[start:start + count], start, seed=seed, shard=s, k=k,
                                    max_new_tokens=length, knobs=knobs, max_batch_tokens=max_batch_tokens,
                                    device=device)
            meta = dict(settings, shard=s, start=start, count=count, shard_seed=shard_seed(seed, s),
                        fingerprint=fingerprint, model_sha256=model_hash, prefixes_sha256=prefix_hash,
                        content_sha256=_content_sha256(tensors))
            path = out_dir / shard_file_name(s)
            for stale in out_dir.glob(f".{path.name}.*.tmp"):  # left by a killed run
                stale.unlink(missing_ok=True)
            atomic_write_bytes(path, save_safetensors(tensors, metadata={_META_KEY: json.dumps(meta, sort_keys=True)}))
            bar.update(1)
    finally:
        bar.close()
        model.train(was_training)

    # 3) rank 0 writes the manifest once every rank is done
    _barrier(info)
    error = None
    if info.is_main:
        try:
            _write_manifest(out_dir, settings, fingerprint, model_hash, prefix_hash, span)
        except ValueError as e:
            error = e
    _collective_raise(error, info, "writing the manifest")
    return NegativeStore(out_dir)


def _check_existing_dir(out_dir: Path, fingerprint: str, num_shards: int) -> None:
    manifest = out_dir / MANIFEST_NAME
    if manifest.exists():
        got = _load_manifest(manifest).get("fingerprint")
        if got != fingerprint:
            raise _mismatch(manifest, str(got), fingerprint)
    for path in sorted(out_dir.glob("shard-*.safetensors")):
        stem = path.name[len("shard-"):-len(".safetensors")]
        if not stem.isdigit() or int(stem) >= num_shards:
            raise ValueError(f"{path} is not a shard of this run ({num_shards} shards); shards of different "
                             f"runs are never mixed, so use another out_dir (or empty this one)")


def _write_manifest(out_dir: Path, settings: dict[str, Any], fingerprint: str, model_hash: str,
                    prefix_hash: str, span: Any) -> None:
    shards = []
    for s in range(settings["num_shards"]):
        path = out_dir / shard_file_name(s)
        if not path.exists():
            raise ValueError(f"{path} is missing after generation: out_dir must be on a file system that "
                             f"every rank shares")
        meta = _read_header(path)
        if meta.get("fingerprint") != fingerprint:
            raise _mismatch(path, str(meta.get("fingerprint")), fingerprint)
        start, count = span(s)
        shards.append({"file": path.name, "shard": s, "start": start, "count": count,
                       "content_sha256": meta.get("content_sha256")})
    manifest = dict(settings, fingerprint=fingerprint, model_sha256=model_hash, prefixes_sha256=prefix_hash,
                    shards=shards)
    atomic_write_text(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def _load_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict) or manifest.get("format") != NEGATIVES_FORMAT:
            raise ValueError(f"format is not {NEGATIVES_FORMAT!r}")
        return manifest
    except (OSError, ValueError) as e:
        raise ValueError(f"{path} is corrupt or not a seqebm negatives manifest ({e}); use another out_dir") from None


# --------------------------------------------------------------------------------------------
# Reading at training time
# --------------------------------------------------------------------------------------------


class NegativeStore:
    """Negatives written by :func:`generate_negatives`; shards are loaded (and checked) lazily.

    ``get`` draws ONE negative per prefix uniformly among its K (Residual EBM, Sec. 4.1: "sample
    uniformly from those samples at training time"); ``all_for`` returns all K, e.g. for the
    log-partition bounds of Sec. 3.2. ``max_cached_shards`` bounds how many shards stay in
    memory (least recently used are dropped); ``None`` keeps every shard once loaded.
    """

    def __init__(self, out_dir: str | Path, *, max_cached_shards: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        path = self.out_dir / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {self.out_dir}: not a finished negatives directory "
                                    f"(rerun generate_negatives with the same arguments to finish it)")
        m = _load_manifest(path)
        try:
            self.num_prefixes, self.prefix_len = int(m["num_prefixes"]), int(m["prefix_len"])
            self.num_per_prefix, self.max_new_tokens = int(m["num_per_prefix"]), int(m["max_new_tokens"])
            self.shard_size, self.num_shards = int(m["shard_size"]), int(m["num_shards"])
            self.fingerprint, self.sampling, self.seed = str(m["fingerprint"]), dict(m["sampling"]), int(m["seed"])
            self.prefixes_sha256 = str(m["prefixes_sha256"])
            shards = list(m["shards"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is corrupt: missing or bad field ({e}); use another out_dir") from None
        if self.num_shards != -(-self.num_prefixes // self.shard_size) or len(shards) != self.num_shards:
            raise ValueError(f"{path} is corrupt: {len(shards)} shards listed, {self.num_shards} declared, "
                             f"{self.num_prefixes} prefixes of {self.shard_size} per shard")
        for s, entry in enumerate(shards):
            if entry.get("shard") != s or not (self.out_dir / str(entry.get("file"))).is_file():
                raise ValueError(f"{path}: shard {s} ({entry.get('file')}) is missing; use another out_dir "
                                 f"or rerun generate_negatives with the same arguments")
        self._entries = shards
        if max_cached_shards is not None and max_cached_shards < 1:
            raise ValueError(f"max_cached_shards must be None or >= 1, got {max_cached_shards}")
        self.max_cached_shards = max_cached_shards
        self._cache: OrderedDict[int, dict[str, Tensor]] = OrderedDict()

    def __len__(self) -> int:
        return self.num_prefixes

    def __repr__(self) -> str:
        return (f"NegativeStore({str(self.out_dir)!r}, num_prefixes={self.num_prefixes}, "
                f"num_per_prefix={self.num_per_prefix}, max_new_tokens={self.max_new_tokens})")

    def verify_prefixes(self, prefixes: Tensor) -> None:
        """Raise ``ValueError`` unless ``prefixes`` (N, P) are the ones the negatives continue."""
        if prefixes_sha256(prefixes) != self.prefixes_sha256:
            raise ValueError(f"these prefixes {tuple(prefixes.shape)} are not the ones the negatives in "
                             f"{self.out_dir} were generated for ({self.num_prefixes}, {self.prefix_len})")

    def shard(self, s: int) -> dict[str, Tensor]:
        """All tensors of shard ``s`` (loaded and checked on first use)."""
        if s in self._cache:
            self._cache.move_to_end(s)
            return self._cache[s]
        entry = self._entries[s]
        start = s * self.shard_size
        tensors = _read_shard(self.out_dir / entry["file"], fingerprint=self.fingerprint, shard=s, start=start,
                              count=min(self.shard_size, self.num_prefixes - start), k=self.num_per_prefix,
                              length=self.max_new_tokens, content_sha256=entry.get("content_sha256"))
        self._cache[s] = tensors
        if self.max_cached_shards is not None and len(self._cache) > self.max_cached_shards:
            self._cache.popitem(last=False)
        return tensors

    def _check_indices(self, prefix_indices: Tensor) -> Tensor:
        if not isinstance(prefix_indices, Tensor) or prefix_indices.dim() != 1 or \
                prefix_indices.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            got = (f"{prefix_indices.dtype} {tuple(prefix_indices.shape)}" if isinstance(prefix_indices, Tensor)
                   else type(prefix_indices).__name__)
            raise ValueError(f"prefix_indices must be a 1-D integer tensor (B,), got {got}")
        idx = prefix_indices.long().cpu()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.num_prefixes):
            raise ValueError(f"prefix_indices must lie in [0, {self.num_prefixes}), got values in "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        return idx

    def _gather(self, idx: Tensor, choice: Tensor | None) -> dict[str, Tensor]:
        b, k, length = idx.shape[0], self.num_per_prefix, self.max_new_tokens
        lead = (b,) if choice is not None else (b, k)
        out = {"tokens": torch.empty(*lead, length, dtype=torch.long),
               "lengths": torch.empty(lead, dtype=torch.long),
               "log_q": torch.empty(lead, dtype=torch.float32),
               "log_p": torch.empty(lead, dtype=torch.float32)}
        shard_of = idx // self.shard_size
        for s in shard_of.unique().tolist():
            where = (shard_of == s).nonzero().squeeze(1)  # batch positions served by shard s
            rows = idx[where] - s * self.shard_size
            data = self.shard(s)
            sel = (rows,) if choice is None else (rows, choice[where])
            for name in out:
                out[name][where] = data[name][sel].to(out[name].dtype)
        return out

    def get(self, prefix_indices: Tensor, generator: torch.Generator | None = None, *,
            with_log_p: bool = False) -> tuple[Tensor, ...]:
        """One negative per prefix, uniform among its K: tokens (B, L) long, lengths (B,) long, log_q (B,).

        ``with_log_p`` appends the raw LM log prob (B,). Residual EBM, Sec. 4.1.
        """
        idx = self._check_indices(prefix_indices)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        choice = torch.randint(self.num_per_prefix, (idx.shape[0],), generator=generator, device=gen_device).cpu()
        out = self._gather(idx, choice)
        return (out["tokens"], out["lengths"], out["log_q"]) + ((out["log_p"],) if with_log_p else ())

    def all_for(self, prefix_indices: Tensor, *, with_log_p: bool = False) -> tuple[Tensor, ...]:
        """All K negatives: tokens (B, K, L) long, lengths (B, K) long, log_q (B, K) [, log_p (B, K)]."""
        out = self._gather(self._check_indices(prefix_indices), None)
        return (out["tokens"], out["lengths"], out["log_q"]) + ((out["log_p"],) if with_log_p else ())
