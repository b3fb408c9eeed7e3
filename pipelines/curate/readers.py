"""Readers: raw shards -> curation document rows.

Formats (dispatched on the file name, then the record's own fields; never guessed from content):
- MMC4 JSONL (plain or .gz): interleaved web documents, images fetched from their URLs.
- OBELICS Parquet: interleaved web documents (aligned `images`/`texts` columns).
- img2dataset output, Parquet (`--output_format parquet`: the image column named after its
  encode format, caption in `txt`) or WebDataset `.tar` (`key.jpg`, `key.txt`, `key.json`):
  caption pairs whose image bytes are in the shard, so nothing is fetched again. The `.parquet`
  img2dataset writes beside each `.tar` holds only metadata and is skipped when its `.tar` is read.
- LLaVA-style conversations (a JSON array or JSONL of {"id", "image", "conversations": [{"from":
  "human"|"gpt"|"system", "value"}]}): instruction data for SFT. Each `<image>` in a turn is the
  next of the record's images (one path or a list), a file relative to `image_root` (default: the
  instruction file's folder). An image in a human turn is read (comprehension); one in a gpt turn
  is an image the assistant draws, DreamLLM's interleaved instruction form.

Pure Python over bytes, so the Ray Data read stage (`read_binary_files`, any pyarrow/fsspec
filesystem) calls them per shard and a unit test calls them on a string. A malformed line or
record becomes a dropped row with a reason; the rest of the shard is kept.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from pathlib import PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from dreamcore.schema import CURATE_DOC_SCHEMA

SUFFIXES = (".jsonl", ".jsonl.gz", ".json.gz", ".json", ".parquet", ".tar")
IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")  # img2dataset encode formats
IMAGE_TOKEN = "<image>"  # LLaVA's placeholder for the next image of a conversation
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
STAGE = "read"


class InputError(ValueError):
    """An input path cannot be read; the message names it and says what is accepted."""


def empty_image(url: str, matched_text_index: int = -1, matched_sim: float = float("nan"),
                face_count: int = -1, source: str = "web", data: bytes | None = None) -> dict:
    return {
        "url": url, "matched_text_index": matched_text_index, "matched_sim": matched_sim, "face_count": face_count,
        "drop_stage": "", "reason": "", "error": "", "http_status": 0, "sha256": "", "phash": "",
        "orig_width": 0, "orig_height": 0, "width": 0, "height": 0, "num_bytes": 0, "data": data,
        "source": source,
    }


def face_count(info: dict) -> int:
    """MMC4's `face_detections` as a count: a list of detections, or null when none were found;
    -1 when the record does not carry the field (safety.face_detector may look instead)."""
    if "face_detections" not in info:
        return -1
    faces = info["face_detections"]
    return len(faces) if isinstance(faces, list) else 0


def _doc(doc_id: str, shard: str, url: str = "", texts=None, similarity=None, images=None, roles=None) -> dict:
    return {
        "doc_id": doc_id, "shard": shard, "url": url, "texts": texts or [],
        "similarity": similarity or [], "drop_stage": "", "reason": "", "error": "",
        "images": images or [], "roles": roles or [],
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


def conversation_record(record: dict, doc_id: str, shard: str, image_root: str = "") -> dict:
    """One LLaVA-style record -> a conversation row (`roles` set; images read from the dataset).

    Each turn is split at its `<image>` placeholders into texts; the k-th placeholder is the k-th
    image, placed right after the text before it (`matched_text_index`), in that turn's role."""
    from dreamcore import storage

    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("field conversations is missing or not a non-empty list")
    paths = record.get("image") or []  # absent or null: a text-only conversation
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError("field image is not a path or a list of paths")
    root = image_root or str(PurePosixPath(shard).parent)
    texts: list[str] = []
    roles: list[str] = []
    images = []
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise ValueError(f"conversations[{t}] has no value string")
        role = ROLES.get(str(turn.get("from", "")))
        if role is None:
            raise ValueError(f"conversations[{t}].from={turn.get('from')!r} is not one of {', '.join(ROLES)}")
        for k, chunk in enumerate(turn["value"].split(IMAGE_TOKEN)):
            if k > 0:  # a placeholder came before this chunk: the next image follows the previous text
                if len(images) >= len(paths):
                    raise ValueError(f"conversations hold more {IMAGE_TOKEN} placeholders than the "
                                     f"{len(paths)} image path(s) of field image")
                rel = paths[len(images)]
                if rel.startswith("/") or "://" in rel or ".." in PurePosixPath(rel).parts:
                    raise ValueError(f"image path {rel!r} must be relative to the image root, inside it")
                images.append(empty_image(storage.join(root, rel), len(texts) - 1, source="dataset"))
            texts.append(chunk.strip())
            roles.append(role)
    if len(images) != len(paths):
        raise ValueError(f"field image lists {len(paths)} path(s) but the conversations hold "
                         f"{len(images)} {IMAGE_TOKEN} placeholder(s)")
    return _doc(doc_id, shard, "", texts, [], images, roles)


def _record(record: Any, doc_id: str, shard: str, image_root: str) -> dict:
    """A JSON record by its own fields: a conversation (instruction data) or an MMC4 document."""
    if isinstance(record, dict) and "conversations" in record:
        return conversation_record(record, doc_id, shard, image_root)
    return mmc4_record(record, doc_id, shard)


def parse_jsonl(data: bytes, shard: str, image_root: str = "") -> list[dict]:
    """JSONL (plain or gzip), or one JSON array (LLaVA's files) -> rows; each bad line or record is
    one dropped row with its reason."""
    name = _shard_name(shard)
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            # A truncated .gz still yields its complete lines; keep them and drop the tail.
            data = _gunzip_prefix(data)
            rows = parse_jsonl(data, shard, image_root)
            rows.append(_dropped(f"{name}:tail", shard, "truncated_gzip", str(e)))
            return rows
    if data.lstrip()[:1] == b"[":
        return _parse_json_array(data, shard, image_root)
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
            rows.append(_record(record, doc_id, shard, image_root))
        except (ValueError, TypeError) as e:
            rows.append(_dropped(doc_id, shard, "missing_fields", f"line {lineno}: {e}"))
    return rows


def _parse_json_array(data: bytes, shard: str, image_root: str) -> list[dict]:
    name = _shard_name(shard)
    try:
        records = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return [_dropped(f"{name}:file", shard, "malformed_json", f"not a JSON array or JSONL: {e}")]
    rows = []
    for i, record in enumerate(records):
        doc_id = f"{name}:{i}"
        try:
            rows.append(_record(record, doc_id, shard, image_root))
        except (ValueError, TypeError) as e:
            rows.append(_dropped(doc_id, shard, "missing_fields", f"record {i}: {e}"))
    return rows


def img2dataset_record(record: dict, image_column: str, doc_id: str, shard: str) -> dict:
    """One img2dataset sample (Parquet row, or a WebDataset sample as a dict) -> a one-image pair
    document whose image bytes ride along (`source` "embedded"). A sample img2dataset itself
    failed to download is dropped with its status and error message."""
    status = record.get("status", "success")
    if status != "success" or not record.get(image_column):
        row = _dropped(doc_id, shard, "source_failed",
                       f"img2dataset status {status!r}: {record.get('error_message') or 'no image bytes'}")
        row["url"] = str(record.get("url") or "")
        return row
    caption = record.get("txt")
    if caption is None:
        caption = record.get("caption")
    if not isinstance(caption, str):
        raise ValueError("sample has no caption (txt or caption)")
    url = str(record.get("url") or record.get("key") or "")
    image = empty_image(url, 0, source="embedded", data=bytes(record[image_column]))
    return _doc(doc_id, shard, url, [caption], [], [image])


def _image_column(names: list[str]) -> str | None:
    return next((c for c in IMAGE_SUFFIXES if c in names), None)


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

    The layout keeps OBELICS's order: each image is matched to the text before it (the layout puts
    an image right after its matched text); images before the first text are matched to an empty
    leading text, so they stay first.
    """
    images_col, texts_col = record.get("images"), record.get("texts")
    if not isinstance(images_col, list) or not isinstance(texts_col, list):
        raise ValueError("fields images and texts must both be lists")
    if len(images_col) != len(texts_col):
        raise ValueError(f"images ({len(images_col)}) and texts ({len(texts_col)}) are not aligned")
    texts: list[str] = []
    images = []
    for img, txt in zip(images_col, texts_col):
        if txt is not None:
            texts.append(str(txt))
        elif img is not None:
            if not texts:
                texts.append("")
            images.append(empty_image(str(img), len(texts) - 1))
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
    names = table.column_names
    pairs = {"key", "status"} <= set(names)  # img2dataset's own columns
    image_column = _image_column(names)
    if pairs and image_column is None:
        return [_dropped(f"{name}:file", shard, "no_image_column",
                         "img2dataset metadata without image bytes (the sidecar of a .tar or files "
                         "output); give the .tar shards, or rerun img2dataset with --output_format parquet")]
    rows = []
    for i, record in enumerate(table.to_pylist()):
        doc_id = f"{name}:{i}"
        try:
            rows.append(img2dataset_record(record, image_column, doc_id, shard) if pairs
                        else obelics_record(record, doc_id, shard))
        except (ValueError, TypeError) as e:
            rows.append(_dropped(doc_id, shard, "missing_fields", f"row {i}: {e}"))
    return rows


def parse_webdataset(data: bytes, shard: str) -> list[dict]:
    """img2dataset's WebDataset output (`key.jpg`, `key.txt`, `key.json` in a tar) -> pair rows."""
    import tarfile

    name = _shard_name(shard)
    samples: dict[str, dict[str, Any]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data)) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                base = PurePosixPath(member.name).name
                key, _, ext = base.partition(".")
                f = tar.extractfile(member)
                samples.setdefault(key, {})[ext.lower()] = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError) as e:
        if not samples:
            return [_dropped(f"{name}:file", shard, "unreadable_tar", str(e))]
        # The samples before the damage are kept; the rest of the shard is one drop row.
        return _webdataset_rows(samples, name, shard) + [_dropped(f"{name}:tail", shard, "truncated_tar", str(e))]
    return _webdataset_rows(samples, name, shard)


def _webdataset_rows(samples: dict[str, dict[str, Any]], name: str, shard: str) -> list[dict]:
    rows = []
    for key, files in samples.items():
        doc_id = f"{name}:{key}"
        try:
            meta = json.loads(files["json"]) if "json" in files else {}
            if not isinstance(meta, dict):
                raise ValueError(f"{key}.json is not an object")
            record = {**meta, "key": key}
            if "txt" in files:
                record["txt"] = files["txt"].decode("utf-8")
            column = _image_column(list(files))
            if column is None:
                raise ValueError(f"sample {key} has no image ({', '.join(IMAGE_SUFFIXES)})")
            record[column] = files[column]
            rows.append(img2dataset_record(record, column, doc_id, shard))
        except (ValueError, TypeError, UnicodeDecodeError) as e:
            rows.append(_dropped(doc_id, shard, "missing_fields", str(e)))
    return rows


def parse_shard(data: bytes, shard: str, image_root: str = "") -> list[dict]:
    """Dispatch on the file name, then on the records' own fields; never a guess from content."""
    if shard.endswith(".parquet"):
        return parse_parquet(data, shard)
    if shard.endswith(".tar"):
        return parse_webdataset(data, shard)
    return parse_jsonl(data, shard, image_root)


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
    shards = sorted(dict.fromkeys(shards))
    # img2dataset writes a metadata-only .parquet beside each .tar: the .tar holds the samples.
    tars = {s[: -len(".tar")] for s in shards if s.endswith(".tar")}
    return [s for s in shards if not (s.endswith(".parquet") and s[: -len(".parquet")] in tars)]


def _filesystem(item: str) -> tuple[pafs.FileSystem, str]:
    if "://" not in item:
        return pafs.LocalFileSystem(), os.path.abspath(item)
    try:
        return pafs.FileSystem.from_uri(item)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as e:
        raise InputError(f"input {item!r}: no filesystem for this URI ({e})") from None
