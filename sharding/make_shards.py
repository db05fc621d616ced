"""Pack one SSv2 split into WebDataset shards of pre-decoded JPEG frames.

    python sharding/make_shards.py --root ROOT --split train --out OUT
    python -m sharding.make_shards --root ROOT --split validation --out s3://bucket/prefix

Reading order: :func:`main` -> :func:`prepare` (all checks that can fail before anything is
written) -> :func:`run` (decode in a process pool, write shards in order).

How the result stays deterministic and resumable:
- shard k holds the input clips [k*N, (k+1)*N) minus that range's rejects, so which shard a
  clip lands in depends only on the input order, never on timing or the number of workers;
- tar members carry fixed mtime/owner/mode, JSON is written with a fixed key order, and
  libjpeg-turbo is deterministic, so the same inputs give byte-identical tars;
- before a shard is published, a small record (``records/shard-XXXXXX.json``: its clip ids,
  samples, rejects, size, sha256 and a fingerprint of the arguments) is written beside it.
  A rerun keeps every shard whose record matches and whose file has the recorded size, and
  builds ``manifest.json`` and ``rejects.jsonl`` from all the records.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import collections
import functools
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field

from tqdm import tqdm

from sharding import storage
from sharding.shard_index import ShardDescription, describe_shard
from sharding.annotations import (
    SPLITS,
    AnnotationError,
    ClipEntry,
    LabelFiles,
    find_label_files,
    label_of,
    read_label_map,
    read_split,
    templates_in_id_order,
)
from sharding.ssv2 import VIDEOS_DIR
from sharding.video import VideoError, decode_sampled, encode_jpeg

FORMAT = "ssv2-frames/1"
VIDEO_EXTENSIONS = (".webm", ".mp4")
RECORDS_SUBDIR = "records"
MANIFEST_NAME = "manifest.json"
REJECTS_NAME = "rejects.jsonl"
# Fixed tar metadata: with time.time() as mtime no two runs would give the same bytes.
TAR_MTIME = 0
TAR_OWNER = "ssv2"

# What a clip becomes unless told otherwise (launch/predict.py reads videos the same way).
DEFAULT_FRAMES, DEFAULT_SHORT_SIDE, DEFAULT_JPEG_QUALITY = 32, 240, 90

# 1: nothing packed, --strict with rejects, or a crashed worker; 2: unusable input or store.
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class InputError(Exception):
    """An argument or input location that makes the whole run impossible."""


class WorkerCrash(RuntimeError):
    """A decoding process died; the finished shards stay, a rerun resumes after them."""


@dataclass(frozen=True)
class PackOptions:
    """What each clip becomes (the arguments that change a sample's bytes)."""

    frames: int
    short_side: int
    upscale: bool
    jpeg_quality: int


@dataclass(frozen=True)
class Job:
    """Everything :func:`run` needs, checked by :func:`prepare`."""

    split: str
    out: str
    videos_dir: Path
    label_files: LabelFiles
    entries: list[ClipEntry]
    label_map: dict[str, int]
    options: PackOptions
    shard_size: int
    workers: int
    strict: bool
    progress: bool
    fingerprint: str
    manifest_args: dict


@dataclass
class ShardRecord:
    """What one finished shard holds; the resume point and the source of the manifest."""

    name: str
    fingerprint: str
    ids: list[str]  # every input clip of the shard's range, packed or rejected
    samples: list[str] = field(default_factory=list)
    rejects: list[dict] = field(default_factory=list)
    bytes: int = 0
    sha256: str = ""
    offsets: list[int] = field(default_factory=list)  # sharding.shard_index: where each sample starts
    crc32c: list[int] = field(default_factory=list)  # sharding.shard_index: each sample's checksum


@dataclass(frozen=True)
class ClipTask:
    """One clip sent to a worker."""

    entry: ClipEntry
    label: int | None
    video_path: str


# ---------------------------------------------------------------- the command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="make_shards",
        description="Pack an SSv2 split into WebDataset shards of T JPEG frames per clip.",
    )
    parser.add_argument("--root", required=True,
                        help="SSv2 root holding the videos (20bn-something-something-v2/) and the label files: "
                             "labels/labels.json + labels/{train,validation,test}.json, or the original release's "
                             "something-something-v2-{labels,train,validation,test}.json in annotations/, labels/ or ROOT")
    parser.add_argument("--split", required=True, choices=SPLITS)
    parser.add_argument("--out", required=True, help="output folder or s3://bucket/prefix")
    parser.add_argument("--labels", help="folder of the label files, either naming (default: the first of ROOT/labels, "
                        "ROOT/annotations, ROOT that holds them)")
    parser.add_argument("--videos", help="video folder (default: ROOT/20bn-something-something-v2)")
    parser.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                        help=f"frames stored per clip, T_s (default {DEFAULT_FRAMES}: the model's 16 are drawn from them, one per "
                             "pair, at random in training and as 2 temporal views in evaluation; see data.frames)")
    parser.add_argument("--short-side", type=int, default=DEFAULT_SHORT_SIDE,
                        help=f"resize the short side to this (default {DEFAULT_SHORT_SIDE})")
    parser.add_argument("--upscale", action="store_true", help="also enlarge clips smaller than --short-side")
    parser.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY,
                        help=f"JPEG quality 1-100 (default {DEFAULT_JPEG_QUALITY})")
    parser.add_argument("--shard-size", type=int, default=256, help="input clips per shard (default 256)")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    parser.add_argument("--limit", type=int, default=None, help="pack only the first N clips of the split")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any clip is rejected")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return parser.parse_args(argv)


def _check_ranges(args: argparse.Namespace) -> None:
    checks = [
        (args.frames >= 1, f"--frames must be >= 1, got {args.frames}"),
        (args.short_side >= 1, f"--short-side must be >= 1, got {args.short_side}"),
        (1 <= args.jpeg_quality <= 100, f"--jpeg-quality must be in 1..100, got {args.jpeg_quality}"),
        (args.shard_size >= 1, f"--shard-size must be >= 1, got {args.shard_size}"),
        (args.workers is None or args.workers >= 1, f"--workers must be >= 1, got {args.workers}"),
        (args.limit is None or args.limit >= 0, f"--limit must be >= 0, got {args.limit}"),
        (args.frames <= 1000, f"--frames must be <= 1000 (3-digit member names), got {args.frames}"),
    ]
    for ok, message in checks:
        if not ok:
            raise InputError(message)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare(args: argparse.Namespace) -> Job:
    """Validate arguments and read the annotations; raises before anything is written."""
    _check_ranges(args)
    root = Path(args.root)
    if not root.is_dir() and not (args.labels and args.videos):
        raise InputError(f"SSv2 root not found: {root}")
    label_files = find_label_files(root, args.split, Path(args.labels) if args.labels else None)
    videos_dir = Path(args.videos) if args.videos else root / VIDEOS_DIR
    label_map = read_label_map(label_files.labels)
    entries = read_split(label_files.split)
    if args.limit is not None:
        entries = entries[: args.limit]
    if not videos_dir.is_dir():
        raise InputError(f"video folder not found: {videos_dir}")
    out = str(args.out)
    if storage.is_s3_url(out):
        storage.check_s3_access(out)
    elif Path(out).exists() and not Path(out).is_dir():
        raise InputError(f"--out exists and is not a folder: {out}")

    options = PackOptions(
        frames=args.frames, short_side=args.short_side, upscale=args.upscale, jpeg_quality=args.jpeg_quality
    )
    # Anything that changes a shard's content changes the fingerprint, so a rerun with other
    # arguments or other annotations rewrites the shards instead of keeping stale ones.
    identity = {
        "format": FORMAT,
        "split": args.split,
        "shard_size": args.shard_size,
        "videos": str(videos_dir.resolve()),
        "labels_sha256": _file_digest(label_files.labels),
        "split_sha256": _file_digest(label_files.split),
        **asdict(options),
    }
    fingerprint = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    manifest_args = {
        "root": str(args.root),
        "labels": str(label_files.labels),
        "split_file": str(label_files.split),
        "videos": str(videos_dir),
        "split": args.split,
        "out": out,
        "frames": args.frames,
        "short_side": args.short_side,
        "upscale": args.upscale,
        "jpeg_quality": args.jpeg_quality,
        "shard_size": args.shard_size,
        "limit": args.limit,
        "strict": args.strict,
    }
    return Job(
        split=args.split,
        out=out,
        videos_dir=videos_dir,
        label_files=label_files,
        entries=entries,
        label_map=label_map,
        options=options,
        shard_size=args.shard_size,
        workers=args.workers or len(os.sched_getaffinity(0)),
        strict=args.strict,
        progress=args.progress,
        fingerprint=fingerprint,
        manifest_args=manifest_args,
    )


# ---------------------------------------------------------------- one clip (in a worker)


def find_video(videos_dir: Path, clip_id: str) -> Path:
    """``<id>.webm`` as SSv2 ships it, or ``<id>.mp4`` from a re-encoded copy; the ``.webm``
    path when neither exists (the worker then reports it missing)."""
    for extension in VIDEO_EXTENSIONS:
        candidate = videos_dir / f"{clip_id}{extension}"
        if candidate.exists():
            return candidate
    return videos_dir / f"{clip_id}{VIDEO_EXTENSIONS[0]}"


def pack_clip(task: ClipTask, options: PackOptions, decode_threads: int = 0) -> tuple[dict | None, dict | None]:
    """(sample, None) for a packed clip or (None, reject) for one that cannot be packed."""
    entry = task.entry
    try:
        clip = decode_sampled(task.video_path, options.frames, options.short_side, options.upscale, decode_threads)
    except VideoError as error:
        return None, _reject(entry.id, error.reason, error.detail)
    sample: dict = {"__key__": entry.id}
    for position, frame in enumerate(clip.frames):
        sample[f"{position:03d}.jpg"] = encode_jpeg(frame, options.jpeg_quality)
    if task.label is not None:
        sample["cls"] = str(task.label).encode("ascii")
    info = {
        "id": entry.id,
        "label_id": task.label,
        "template": entry.template,
        "label": entry.label_text,
        "placeholders": list(entry.placeholders),
        "source_frames": clip.source_frames,
        "fps": round(clip.fps, 6),
        "frame_indices": clip.frame_indices,
        "width": clip.width,
        "height": clip.height,
        "repeated_frames": clip.repeated_frames,
        "rotation": clip.rotation,
    }
    sample["json"] = json.dumps(info, ensure_ascii=False).encode("utf-8")
    return sample, None


# ---------------------------------------------------------------- shards (in the parent)


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


SHARD_STEM = re.compile(r"shard-(\d{6})")


def _record_url(out: str, name: str) -> str:
    return storage.join(storage.join(out, RECORDS_SUBDIR), name.replace(".tar", ".json"))


def _load_finished(job: Job, ranges: list[list[ClipEntry]]) -> dict[int, ShardRecord]:
    """Records of shards a previous run finished with the same arguments and inputs."""
    sizes = storage.list_sizes(job.out)
    record_names = set(storage.list_names(storage.join(job.out, RECORDS_SUBDIR)))
    finished = {}
    for index, entries in enumerate(ranges):
        name = shard_name(index)
        if name.replace(".tar", ".json") not in record_names:
            continue
        try:
            record = ShardRecord(**json.loads(storage.read_bytes(_record_url(job.out, name))))
        except (ValueError, TypeError):
            continue  # a damaged record: the shard is simply rewritten
        same_input = record.fingerprint == job.fingerprint and record.ids == [e.id for e in entries]
        published = not record.samples or sizes.get(name) == record.bytes
        if same_input and published:
            finished[index] = record
    return finished


def _reject(clip_id: str, reason: str, detail: str) -> dict:
    return {"id": clip_id, "reason": reason, "detail": detail}


def _screen(job: Job) -> tuple[dict[int, dict], dict[int, ClipTask]]:
    """Rejects found without decoding, and the tasks for the workers, by input position."""
    rejects: dict[int, dict] = {}
    tasks: dict[int, ClipTask] = {}
    seen: set[str] = set()
    labelled = job.split != "test"
    for position, entry in enumerate(job.entries):
        # A '.' would split the webdataset key from the member name, a '/' make a folder.
        if not entry.id or "." in entry.id or "/" in entry.id:
            rejects[position] = _reject(entry.id, "invalid_id", "an id must be non-empty, without '.' or '/'")
        elif entry.id in seen:
            rejects[position] = _reject(entry.id, "duplicate_id", f"id {entry.id} appears earlier in {job.split}.json")
        elif labelled and label_of(entry, job.label_map) is None:
            detail = f"template {entry.template!r} is not in labels.json"
            rejects[position] = _reject(entry.id, "unknown_template", detail)
        else:
            label = label_of(entry, job.label_map) if labelled else None
            tasks[position] = ClipTask(entry, label, str(find_video(job.videos_dir, entry.id)))
        seen.add(entry.id)
    return rejects, tasks


class _ShardFile:
    """A shard being written under a temporary name; visible only after :meth:`publish`."""

    def __init__(self, job: Job, name: str, scratch: Path):
        self.url = storage.join(job.out, name)
        folder = scratch if storage.is_s3_url(job.out) else Path(job.out)
        handle, temp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".partial")
        os.close(handle)
        self.temp = Path(temp)
        # Imported here, not at the top: webdataset pulls in torch (~3 s), and the spawned
        # decoding workers, which import this module, never write tars.
        from webdataset import TarWriter

        self.writer = TarWriter(str(self.temp), encoder=False, mtime=TAR_MTIME, user=TAR_OWNER, group=TAR_OWNER)

    def close(self) -> ShardDescription:
        """Finish the tar; returns its size, sha256, sample offsets and CRC-32Cs."""
        self.writer.close()
        return describe_shard(self.temp)

    def publish(self) -> None:
        storage.put_file(self.temp, self.url)

    def discard(self) -> None:
        self.temp.unlink(missing_ok=True)


def _remove_stale_partials(out: str) -> None:
    """Temporary files a killed run left behind (only our own ``.*.partial`` names)."""
    if storage.is_s3_url(out):
        return
    for folder in (Path(out), Path(out) / RECORDS_SUBDIR):
        for leftover in folder.glob(".*.partial"):
            leftover.unlink(missing_ok=True)


def _remove_shards_beyond(out: str, count: int) -> None:
    """Shards and records numbered ``count`` or more, left by an earlier run over more clips:
    the manifest no longer lists them, and a reader globbing ``shard-*.tar`` must not see them."""
    for folder, suffix in ((out, ".tar"), (storage.join(out, RECORDS_SUBDIR), ".json")):
        for name in storage.list_names(folder):
            match = SHARD_STEM.fullmatch(name[: -len(suffix)]) if name.endswith(suffix) else None
            if match and int(match.group(1)) >= count:
                storage.remove(storage.join(folder, name))


@dataclass
class Summary:
    samples: int
    rejects: collections.Counter
    shards: int
    bytes: int
    seconds: float
    kept_shards: int
    processed: int  # clips of this run's shards (those in kept shards were not looked at)

    def lines(self) -> list[str]:
        reasons = ", ".join(f"{reason}={count}" for reason, count in sorted(self.rejects.items())) or "none"
        return [
            f"packed {self.samples} clips into {self.shards} shards ({self.bytes / 1e6:.1f} MB), "
            f"{self.kept_shards} kept from an earlier run",
            f"rejected {sum(self.rejects.values())} clips: {reasons}",
            f"took {self.seconds:.1f} s ({self.processed / max(self.seconds, 1e-9):.1f} clips/s)",
        ]


def _in_order(pool: ProcessPoolExecutor, function, tasks: list, window: int):
    """``map(function, tasks)`` on the pool: results in input order (what makes the shards
    independent of the number of workers), at most ``window`` clips ahead of the consumer
    (so encoded clips cannot pile up in memory while a shard uploads)."""
    pending: collections.deque = collections.deque()
    upcoming = iter(tasks)
    for task in itertools.islice(upcoming, window):
        pending.append(pool.submit(function, task))
    while pending:
        try:
            result = pending.popleft().result()
        except BrokenProcessPool as error:
            raise WorkerCrash("a decoding worker died (a crash in the decoder or out of memory)") from error
        for task in itertools.islice(upcoming, 1):
            pending.append(pool.submit(function, task))
        yield result


def run(job: Job) -> Summary:
    """Pack the clips of ``job``; returns the totals over all shards (kept ones included)."""
    started = time.monotonic()
    size = job.shard_size
    ranges = [job.entries[start : start + size] for start in range(0, len(job.entries), size)]
    if not storage.is_s3_url(job.out):
        Path(job.out).mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(job.out)
    finished = _load_finished(job, ranges)
    pre_rejects, tasks = _screen(job)
    todo = [
        tasks[position]
        for index in range(len(ranges))
        if index not in finished
        for position in range(index * size, index * size + len(ranges[index]))
        if position in tasks
    ]

    records: dict[int, ShardRecord] = dict(finished)
    workers = min(job.workers, max(1, len(todo)))
    # One process alone lets the decoder thread over all cores; several share them out
    # instead of each starting a thread per core.
    decode_threads = 0 if workers == 1 else max(1, len(os.sched_getaffinity(0)) // workers)
    pack = functools.partial(pack_clip, options=job.options, decode_threads=decode_threads)
    # spawn, not fork: the caller (a test, a notebook) may hold threads whose locks a forked
    # child would inherit mid-use.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    try:
        results = _in_order(pool, pack, todo, window=4 * workers) if pool else map(pack, todo)
        bar = tqdm(
            total=len(job.entries),
            initial=sum(len(ranges[index]) for index in finished),
            unit="clip",
            desc=f"packing {job.split}",
            disable=not job.progress,
        )
        with tempfile.TemporaryDirectory(prefix="make_shards-") as scratch, bar:
            for index, entries in enumerate(ranges):
                if index not in finished:
                    records[index] = _write_shard(job, index, entries, pre_rejects, results, Path(scratch), bar)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    ordered = [records[index] for index in range(len(ranges))]
    _write_index(job, ordered)
    _remove_shards_beyond(job.out, len(ranges))
    return Summary(
        samples=sum(len(record.samples) for record in ordered),
        rejects=collections.Counter(reject["reason"] for record in ordered for reject in record.rejects),
        shards=sum(1 for record in ordered if record.samples),
        bytes=sum(record.bytes for record in ordered),
        seconds=time.monotonic() - started,
        kept_shards=sum(1 for record in finished.values() if record.samples),
        processed=sum(len(entries) for index, entries in enumerate(ranges) if index not in finished),
    )


def _write_shard(job: Job, index: int, entries, pre_rejects, results, scratch: Path, bar) -> ShardRecord:
    """Write shard ``index`` from its input range, taking worker results in order."""
    name = shard_name(index)
    record = ShardRecord(name=name, fingerprint=job.fingerprint, ids=[entry.id for entry in entries])
    shard = _ShardFile(job, name, scratch)
    try:
        first = index * job.shard_size
        for position, entry in enumerate(entries, start=first):
            if position in pre_rejects:
                record.rejects.append(pre_rejects[position])
            else:
                sample, reject = next(results)
                returned_id = sample["__key__"] if sample is not None else reject["id"]
                assert returned_id == entry.id, f"worker result for {returned_id} where {entry.id} was due"
                if sample is not None:
                    shard.writer.write(sample)
                    record.samples.append(entry.id)
                else:
                    record.rejects.append(reject)
            bar.update(1)
        description = shard.close()
        record.bytes, record.sha256 = description.bytes, description.sha256
        record.offsets, record.crc32c = description.offsets, description.crc32c
        if not record.samples:
            # every clip of the range was rejected: no empty tar (nor one left by an earlier
            # run with other arguments), the record says why
            shard.discard()
            storage.remove(shard.url)
            record.bytes, record.sha256, record.offsets, record.crc32c = 0, "", [], []
        # Record first, then the file: a rerun keeps a shard only when both are there, so a
        # kill between the two costs one rewrite, never a kept shard without its record.
        storage.write_bytes(_record_url(job.out, name), json.dumps(asdict(record), indent=1).encode())
        if record.samples:
            shard.publish()
    except BaseException:
        shard.discard()
        raise
    return record


def _write_index(job: Job, records: list[ShardRecord]) -> None:
    """``rejects.jsonl`` and ``manifest.json``, rebuilt from the records of all shards."""
    rejects = "".join(json.dumps(reject, ensure_ascii=False) + "\n" for record in records for reject in record.rejects)
    storage.write_bytes(storage.join(job.out, REJECTS_NAME), rejects.encode("utf-8"))
    manifest = {
        "format": FORMAT,
        "split": job.split,
        "frames": job.options.frames,
        "short_side": job.options.short_side,
        "jpeg_quality": job.options.jpeg_quality,
        "templates": templates_in_id_order(job.label_map),
        "num_samples": sum(len(record.samples) for record in records),
        "num_rejected": sum(len(record.rejects) for record in records),
        # offsets, crc32c: absent for shards packed before the index existed (python -m sharding.shard_index adds them)
        "shards": [
            {"name": record.name, "num_samples": len(record.samples), "bytes": record.bytes, "sha256": record.sha256,
             **({"offsets": record.offsets} if record.offsets else {}),
             **({"crc32c": record.crc32c} if record.crc32c else {})}
            for record in records
            if record.samples
        ],
        "args": job.manifest_args,
    }
    text = json.dumps(manifest, indent=1, ensure_ascii=False) + "\n"
    storage.write_bytes(storage.join(job.out, MANIFEST_NAME), text.encode("utf-8"))


def _error(message: str) -> None:
    print(f"make_shards: error: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = prepare(args)
        print(f"labels: {job.label_files.labels}; {job.split}: {job.label_files.split} ({len(job.entries)} clips)")
        summary = run(job)
    except (InputError, AnnotationError, storage.StorageError) as error:
        _error(str(error))
        return EXIT_BAD_INPUT
    except WorkerCrash as error:
        _error(f"{error}; the finished shards are kept: rerun the same command to resume")
        return EXIT_FAILED
    for line in summary.lines():
        print(line)
    if summary.samples == 0:
        _error(f"no clip of {job.split} could be packed (see {storage.join(job.out, REJECTS_NAME)})")
        return EXIT_FAILED
    if job.strict and summary.rejects:
        rejected = sum(summary.rejects.values())
        _error(f"--strict and {rejected} clips rejected (see {storage.join(job.out, REJECTS_NAME)})")
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
