"""The offline teacher cache on disk: the teacher's LM-head input per training example, and its checks.

Every teacher quantity the objective uses is a function of the teacher's LM-head input ``h`` (the last
hidden state after the final norm): logits = ``lm_head(h)``, Flex-KD targets = columns of ``h``, importance
scores = a closed form of ``h`` and the head. Caching ``h`` at every token of every training example (all
non-pad positions: a superset of what any loss reads, whatever ``loss.feature_tokens``) is therefore exact.

Layout of ``teacher_cache.dir``::

    build.json                       what is being built (the manifest's fields), written first
    shard-r00000-s00000.safetensors  rank 0's first shard: tensor ``h<id>`` (n_tokens, d_T) per example id
    shard-r00000-s00000.json         its sidecar: example ids, tokens, bytes, sha256 (written after the shard)
    manifest.json                    fields + shard list with sha256 (rank 0, after every shard is written)
    COMPLETE                         the completion marker, written last

Contracts: a shard counts as done only when its sidecar exists, lists the expected example ids and the
shard file's sha256 matches it (a killed build resumes at shard granularity). ``COMPLETE`` is written only
after ``manifest.json``, which is written only when every shard is done: a cache without ``COMPLETE`` is never
read. Every file is written atomically (temp + rename). Example ids are positions in the tokenised training
set (``data.InstructionDataset``), so any data order, seed, epoch or world size reuses the cache; the
``data_sha256`` field pins the tokenised examples themselves.

Pure torch + safetensors: no DeepSpeed, no collectives (the job in ``jobs/cache_teacher.py`` owns those).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
BUILD = "build.json"
STORE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}

# The fields a cache must match to be used, in the order a mismatch is reported (the most telling first).
CHECKED_FIELDS = (
    "teacher",
    "head_sha256",
    "compute_dtype",
    "tokenizer",
    "vocab_size",
    "data_source",
    "prompt_style",
    "max_length",
    "max_prompt_length",
    "data_sha256",
    "num_examples",
    "d_teacher",
    "dtype",
)


class TeacherCacheError(ValueError):
    """A teacher cache that cannot be used: another run's, incomplete, or corrupted."""


# ------------------------------------------------------------------------------------------------ hashes
def tensors_sha256(*tensors: torch.Tensor | None) -> str:
    """sha256 of the tensors' values as float32 (shape included); ``None`` entries hash as a marker."""
    digest = hashlib.sha256()
    for tensor in tensors:
        if tensor is None:
            digest.update(b"none")
            continue
        values = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(repr(tuple(values.shape)).encode())
        digest.update(values.numpy().tobytes())
    return digest.hexdigest()


def examples_sha256(examples: Iterable[Mapping]) -> str:
    """sha256 of the tokenised examples in order (input ids and labels): pins what each example id means."""
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([list(example["input_ids"]), list(example["labels"])]).encode())
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ writing
def shard_name(rank: int, slot: int) -> str:
    return f"shard-r{rank:05d}-s{slot:05d}"


def _write_json(path: Path, value) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    tmp.replace(path)


def write_shard(directory: str | os.PathLike, name: str, hidden_by_id: Mapping[int, torch.Tensor]) -> dict:
    """Write ``<name>.safetensors`` (tensor ``h<id>`` (n_tokens, d_T) per example) then its sidecar JSON.
    The tensors are stored as given (the caller casts to the cache dtype). Returns the sidecar."""
    directory = Path(directory)
    path = directory / f"{name}.safetensors"
    tmp = path.with_name(path.name + ".tmp")
    tensors = {f"h{i}": h.detach().contiguous().cpu() for i, h in hidden_by_id.items()}
    save_file(tensors, str(tmp), metadata={"format": f"flexkd-teacher-cache-{FORMAT_VERSION}"})
    tmp.replace(path)
    sidecar = {
        "file": path.name,
        "sha256": file_sha256(path),
        "example_ids": sorted(int(i) for i in hidden_by_id),
        "tokens": int(sum(h.shape[0] for h in hidden_by_id.values())),
        "bytes": path.stat().st_size,
    }
    _write_json(directory / f"{name}.json", sidecar)
    return sidecar


def read_sidecar(directory: str | os.PathLike, name: str) -> dict | None:
    path = Path(directory) / f"{name}.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return None


def shard_done(directory: str | os.PathLike, name: str, example_ids: Sequence[int]) -> bool:
    """Whether shard ``name`` is complete and intact: its sidecar lists ``example_ids`` and the file's
    sha256 matches the sidecar (a shard written by a killed build, or another world size's, is not)."""
    sidecar = read_sidecar(directory, name)
    if sidecar is None or sidecar.get("example_ids") != sorted(int(i) for i in example_ids):
        return False
    path = Path(directory) / sidecar["file"]
    return path.is_file() and file_sha256(path) == sidecar["sha256"]


def cache_state(directory: str | os.PathLike | None) -> str:
    """``"absent"`` (no build started), ``"incomplete"`` (started, no marker) or ``"complete"``."""
    if directory is None:
        return "absent"
    if (Path(directory) / COMPLETE).is_file():
        return "complete"
    return "incomplete" if (Path(directory) / BUILD).is_file() else "absent"


def write_build_record(directory: str | os.PathLike, fields: Mapping) -> None:
    """Record what is being built (first, before any shard): a resumed build must be the same build."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    _write_json(Path(directory) / BUILD, dict(fields))


def read_build_record(directory: str | os.PathLike) -> dict | None:
    path = Path(directory) / BUILD
    return json.loads(path.read_text()) if path.is_file() else None


def finalize(directory: str | os.PathLike, fields: Mapping, shard_names: Sequence[str]) -> dict:
    """Write ``manifest.json`` from the shards' sidecars, then the ``COMPLETE`` marker (last).
    Raises if a shard is missing."""
    directory = Path(directory)
    shards, index_size, tokens, nbytes = [], 0, 0, 0
    for name in shard_names:
        sidecar = read_sidecar(directory, name)
        if sidecar is None:
            raise TeacherCacheError(
                f"teacher cache {directory}: shard {name} was not written; rerun the build"
            )
        shards.append(sidecar)
        index_size += len(sidecar["example_ids"])
        tokens += sidecar["tokens"]
        nbytes += sidecar["bytes"]
    if index_size != fields["num_examples"]:
        raise TeacherCacheError(
            f"teacher cache {directory}: the shards hold {index_size} examples, expected "
            f"{fields['num_examples']}; rerun the build"
        )
    element = torch.finfo(STORE_DTYPES[fields["dtype"]]).bits // 8
    manifest = {
        "format": FORMAT_VERSION,
        **fields,
        "tokens": tokens,
        "bytes_per_token": fields["d_teacher"] * element,
        "bytes": nbytes,
        "shards": shards,
    }
    _write_json(directory / MANIFEST, manifest)
    (directory / COMPLETE).write_text("complete\n")
    return manifest


# ------------------------------------------------------------------------------------------------ checks
def mismatches(recorded: Mapping, expected: Mapping) -> list[str]:
    """``field: cache X, this run Y`` for every checked field that differs."""
    return [
        f"{field}: cache {recorded.get(field)!r}, this run {expected.get(field)!r}"
        for field in CHECKED_FIELDS
        if recorded.get(field) != expected.get(field)
    ]


def check_matches(directory: str | os.PathLike, recorded: Mapping, expected: Mapping, what: str) -> None:
    """Refuse a cache (or a partial build) made for another teacher, head, tokenizer, data or dtype."""
    differ = mismatches(recorded, expected)
    if differ:
        raise TeacherCacheError(
            f"teacher cache {directory} ({what}) was made for another run; differing fields:\n  "
            + "\n  ".join(differ)
            + "\npoint teacher_cache.dir at a new directory (it is built there), or delete "
            f"{directory} to rebuild it for this run, or change the run back to the cache's settings"
        )


# ------------------------------------------------------------------------------------------------ reading
class TeacherCache:
    """A complete, checked cache; ``hidden(example_id)`` -> (n_tokens, d_T) in the stored dtype.

    ``open`` refuses a cache without the ``COMPLETE`` marker, one whose manifest differs from ``expected``
    in a checked field, and (``verify=True``) one whose shard files do not match their sha256.
    """

    def __init__(self, directory: Path, manifest: dict) -> None:
        self.directory, self.manifest = directory, manifest
        self._where = {i: shard["file"] for shard in manifest["shards"] for i in shard["example_ids"]}
        self._handles: dict[str, object] = {}

    @classmethod
    def open(
        cls, directory: str | os.PathLike, expected: Mapping | None = None, *, verify: bool = True
    ) -> TeacherCache:
        directory = Path(directory)
        if not (directory / COMPLETE).is_file() or not (directory / MANIFEST).is_file():
            raise TeacherCacheError(
                f"teacher cache {directory} is incomplete (no {COMPLETE} marker): its build did not finish. "
                "Rerun launch/cache_teacher.py with the same config (it resumes), or launch/distill.py "
                "(it finishes the build before training)"
            )
        manifest = json.loads((directory / MANIFEST).read_text())
        if expected is not None:
            check_matches(directory, manifest, expected, MANIFEST)
        if verify:
            for shard in manifest["shards"]:
                path = directory / shard["file"]
                if not path.is_file() or file_sha256(path) != shard["sha256"]:
                    raise TeacherCacheError(
                        f"teacher cache {directory}: shard {shard['file']} is missing or its sha256 does not "
                        f"match {MANIFEST} (corrupted or changed). Delete {directory} and rebuild it "
                        "(launch/cache_teacher.py or launch/distill.py with this teacher_cache.dir)"
                    )
        return cls(directory, manifest)

    def __len__(self) -> int:
        return len(self._where)

    @property
    def width(self) -> int:
        return int(self.manifest["d_teacher"])

    def hidden(self, example_id: int) -> torch.Tensor:
        """The teacher's LM-head input at every token of example ``example_id``: (n_tokens, d_T)."""
        try:
            file = self._where[int(example_id)]
        except KeyError:
            raise TeacherCacheError(
                f"teacher cache {self.directory} has no example {example_id} (it holds {len(self)})"
            ) from None
        handle = self._handles.get(file)
        if handle is None:
            handle = self._handles[file] = safe_open(str(self.directory / file), framework="pt")
        return handle.get_tensor(f"h{int(example_id)}")

    def batch_hidden(
        self, example_ids: Sequence[int | None], width: int, *, dtype: torch.dtype, device
    ) -> torch.Tensor:
        """(B, width, d_T) right-padded like ``data.collate``: example rows at their tokens, zeros at padding
        and for ``None`` (a scoring placeholder)."""
        out = torch.zeros(len(example_ids), width, self.width, dtype=dtype)
        for row, example_id in enumerate(example_ids):
            if example_id is not None:
                h = self.hidden(example_id)
                out[row, : h.shape[0]] = h.to(dtype)
        return out.to(device)
