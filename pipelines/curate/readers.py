"""Readers: raw shards (MMC4 JSONL/.gz, OBELICS Parquet) -> curation document rows.

Pure Python over bytes, so the Ray Data read stage (`read_binary_files`, any pyarrow/fsspec
filesystem) calls them per shard and a unit test calls them on a string. A malformed line or
record becomes a dropped row with a reason; the rest of the shard is kept.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dreamcore.schema import CURATE_DOC_SCHEMA

SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".json", ".parquet")
STAGE = "read"


class InputError(ValueError):
    """An input path cannot be read; the message names it and says what is accepted."""


def empty_image(url: str, matched_text_index: int = -1, matched_sim: float = float("nan"),
                face_count: int = -1) -> dict:
    return {
        "url": url, "matched_text_index": matched_text_index, "matched_sim": matched_sim, "face_count": face_count,
        "drop_stage": "", "reason": "", "error": "", "http_status": 0, "sha256": "", "phash": "",
        "orig_width": 0, "orig_height": 0, "width": 0, "height": 0, "num_bytes": 0, "data": None,
    }


def face_count(info: dict) -> int:
    """MMC4's `face_detections` as a count: a list of detections, or null when none were found;
    -1 when the record does not carry the field (safety.face_detector may look instead)."""
    if "face_detections" not in info:
        return -1
    faces = info["face_detections"]
    return len(faces) if isinstance(faces, list) else 0


def _doc(doc_id: str, shard: str, url: str = "", texts=None, similarity=None, images=None) -> dict:
    return {
        "doc_id": doc_id, "shard": shard, "url": url, "texts": texts or [],
        "similarity": similarity or [], "drop_stage": "", "reason": "", "error": "",
        "images": images or [],
    }


def _dropped(doc_id: str, shard: str, reason: str, error: str) -> dict:
    row = _doc(doc_id, shard)
    row.update(drop_stage=STAGE, reason=reason, error=error[:500])
    return row


def _shard_name(path: str) -> str:
    return PurePosixPath(path).name


def mmc4_record(record: Any, doc_id: str, shard: str) -> dict:
    """One MMC4 JSON object -> document row (raises ValueError naming the bad field).

    Each image keeps MMC4's own `matched_text_index` / `matched_sim`: with similarity.placement
    "source" they are the placement the curated document keeps."""
    if not isinstance(record, dict):
        raise ValueError(f"expected a JSON object, got {type(record).__name__}")
    texts = record.get("text_list")
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise ValueError("field text_list is missing or not a list of strings")
    infos = record.get("image_info")
    if not isinstance(infos, list):
        raise ValueError("field image_info is missing or not a list")
    images = []
    for i, info in enumerate(infos):
        if not isinstance(info, dict) or not isinstance(info.get("raw_url"), str):
            raise ValueError(f"image_info[{i}] has no raw_url string")
        idx = info.get("matched_text_index")
        if idx is None:  # absent or null: no source placement (similarity.placement decides)
            idx = -1
        if not isinstance(idx, int) or isinstance(idx, bool):
            raise ValueError(f"image_info[{i}].matched_text_index is not an integer")
        sim = info.get("matched_sim")
        images.append(empty_image(info["raw_url"], idx, float(sim) if sim is not None else float("nan"),
                                  face_count(info)))
    sim_matrix = record.get("similarity_matrix") or []
    if sim_matrix and (
        len(sim_matrix) != len(images) or any(len(row) != len(texts) for row in sim_matrix)
    ):
        raise ValueError(
            f"similarity_matrix is not images x sentences ({len(images)} x {len(texts)})"
        )
    return _doc(doc_id, shard, str(record.get("url") or ""), texts, sim_matrix, images)


def parse_jsonl(data: bytes, shard: str) -> list[dict]:
    """MMC4 JSONL (plain or gzip) -> rows; each bad line is one dropped row with its reason."""
    name = _shard_name(shard)
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            # A truncated .gz still yields its complete lines; keep them and drop the tail.
            data = _gunzip_prefix(data)
            rows = parse_jsonl(data, shard)
            rows.append(_dropped(f"{name}:tail", shard, "truncated_gzip", str(e)))
            return rows
    rows = []
    for lineno, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        doc_id = f"{name}:{lineno}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            rows.append(_dropped(doc_id, shard, "malformed_json", f"line {lineno}: {e}"))
            continue
        try:
            rows.append(mmc4_record(record, doc_id, shard))
        except (ValueError, TypeError) as e:
            rows.append(_dropped(doc_id, shard, "missing_fields", f"line {lineno}: {e}"))
    return rows


def _gunzip_prefix(data: bytes) -> bytes:
    """Everything a cut gzip stream still decompresses to, up to its last complete line."""
    import zlib

    try:
        text = zlib.decompressobj(wbits=31).decompress(data)
    except zlib.error:
        return b""
    return text[: text.rfind(b"\n") + 1]


def obelics_record(record: dict, doc_id: str, shard: str) -> dict:
    """OBELICS row (aligned `images`/`texts` lists: one of each is None at every position).

    The image at position p is matched to the next text after it (OBELICS puts an image before
    the text it illustrates); a trailing image is matched to the last text.
    """
    images_col, texts_col = record.get("images"), record.get("texts")
    if not isinstance(images_col, list) or not isinstance(texts_col, list):
        raise ValueError("fields images and texts must both be lists")
    if len(images_col) != len(texts_col):
        raise ValueError(f"images ({len(images_col)}) and texts ({len(texts_col)}) are not aligned")
    texts: list[str] = []
    pending: list[str] = []
    images = []
    for img, txt in zip(images_col, texts_col):
        if txt is not None:
            texts.append(str(txt))
            for url in pending:
                images.append(empty_image(url, len(texts) - 1))
            pending = []
        elif img is not None:
            pending.append(str(img))
    for url in pending:
        images.append(empty_image(url, max(len(texts) - 1, 0)))
    url = ""
    meta = record.get("general_metadata")
    if isinstance(meta, str):
        try:
            url = str(json.loads(meta).get("url", ""))
        except (json.JSONDecodeError, AttributeError):
            url = ""
    return _doc(doc_id, shard, url, texts, [], images)


def parse_parquet(data: bytes, shard: str) -> list[dict]:
    name = _shard_name(shard)
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowInvalid, OSError) as e:
        return [_dropped(f"{name}:file", shard, "unreadable_parquet", str(e))]
    rows = []
    for i, record in enumerate(table.to_pylist()):
        doc_id = f"{name}:{i}"
        try:
            rows.append(obelics_record(record, doc_id, shard))
        except (ValueError, TypeError) as e:
            rows.append(_dropped(doc_id, shard, "missing_fields", f"row {i}: {e}"))
    return rows


def parse_shard(data: bytes, shard: str) -> list[dict]:
    """Dispatch on the file name; the reader never guesses a format from content."""
    if shard.endswith(".parquet"):
        return parse_parquet(data, shard)
    return parse_jsonl(data, shard)


def local_shard_is_empty(shard: str, max_bytes: int = 4096) -> bool:
    """True when `shard` is a small local file with no documents (zero bytes, blank lines, an empty
    table). The job checks this on the driver so an empty input needs no Ray work; remote and larger
    shards answer False (no network here) and go through the job, which handles empty groups too."""
    if "://" in shard and not shard.startswith("file://"):
        return False
    path = shard.removeprefix("file://")
    try:
        if os.path.getsize(path) > max_bytes:
            return False
        with open(path, "rb") as f:
            return not parse_shard(f.read(), shard)
    except OSError:
        return False


def rows_to_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=CURATE_DOC_SCHEMA)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Paths/URIs/globs/folders -> sorted shard list (local paths made absolute)."""
    shards: list[str] = []
    for item in inputs:
        fs, path = _filesystem(item)
        prefix = item[: len(item) - len(path)] if "://" in item else ""
        if any(c in path for c in "*?["):
            import fnmatch

            base = path[: min(path.find(c) for c in "*?[" if c in path)].rsplit("/", 1)[0] or "/"
            found = fs.get_file_info(pafs.FileSelector(base, recursive=True))
            matched = [f.path for f in found if f.is_file and fnmatch.fnmatch(f.path, path)]
            if not matched:
                raise InputError(f"input {item!r} matches no files")
            shards += [prefix + p for p in matched]
            continue
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input {item!r} does not exist (give a shard file, a folder or a glob)")
        if info.type == pafs.FileType.Directory:
            found = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            matched = [f.path for f in found if f.is_file and f.path.endswith(SUFFIXES)]
            if not matched:
                raise InputError(f"folder {item!r} holds no {', '.join(SUFFIXES)} files")
            shards += [prefix + p for p in matched]
            continue
        if not path.endswith(SUFFIXES):
            raise InputError(f"input {item!r} is not a shard; accepted suffixes: {', '.join(SUFFIXES)}")
        shards.append(prefix + path)
    return sorted(dict.fromkeys(shards))


def _filesystem(item: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in item:
        return pafs.LocalFileSystem(), os.path.abspath(item)
    try:
        return pafs.FileSystem.from_uri(item)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise InputError(f"input {item!r}: no filesystem for this URI ({e})") from None
