"""DIR/manifest.json: counts per stage (in = out + dropped by reason, documents and images),
outputs, config, schema version, tokenizer hash, durations, finished shards.

Counts are computed from accounting rows (one per document and per image, carrying the stage and
reason that dropped it, "" if kept), so the invariant holds by construction and a test checks it.
The file is written to a temp name and renamed: a reader never sees half a manifest. In an object
store (DIR is a URI) it is one PUT, which S3 makes visible whole or not at all.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from dreamcore import storage
from dreamcore.schema import SCHEMA_VERSION

STAGES = ("read", "crawl", "filter", "dedup", "similarity", "documents", "tokenize", "write")
MANIFEST = "manifest.json"


def empty_stage() -> dict[str, Any]:
    return {"in": {"documents": 0, "images": 0}, "out": {"documents": 0, "images": 0},
            "dropped": {"documents": {}, "images": {}}}


def stage_counts(docs: list[tuple[str, str]], images: list[tuple[str, str]],
                 written: tuple[int, int]) -> dict[str, dict]:
    """docs/images: (drop_stage, reason) per item ("" stage: kept through tokenize).

    `written` = (documents, images) found in the published samples: the write stage's out.
    """
    out: dict[str, dict] = {}
    remaining = {"documents": len(docs), "images": len(images)}
    dropped = {"documents": Counter(docs), "images": Counter(images)}
    for stage in STAGES:
        st = empty_stage()
        for kind in ("documents", "images"):
            st["in"][kind] = remaining[kind]
            if stage == "write":
                lost = remaining[kind] - written[0 if kind == "documents" else 1]
                if lost:
                    st["dropped"][kind]["missing_from_output"] = lost
            else:
                for (s, reason), n in sorted(dropped[kind].items()):
                    if s == stage:
                        st["dropped"][kind][reason] = st["dropped"][kind].get(reason, 0) + n
            st["out"][kind] = st["in"][kind] - sum(st["dropped"][kind].values())
            remaining[kind] = st["out"][kind]
        out[stage] = st
    unknown = {s for s, _ in list(dropped["documents"]) + list(dropped["images"])} - set(STAGES) - {""}
    if unknown:
        raise ValueError(f"accounting rows name unknown stages {sorted(unknown)}; known: {STAGES}")
    return out


def merge_stages(a: dict[str, dict], b: dict[str, dict]) -> dict[str, dict]:
    """Sum two runs' stage counts (a resumed job adds each shard group to the manifest)."""
    merged = {}
    for stage in STAGES:
        x, y = a[stage], b[stage]
        m = empty_stage()
        for side in ("in", "out"):
            for kind in ("documents", "images"):
                m[side][kind] = x[side][kind] + y[side][kind]
        for kind in ("documents", "images"):
            c = Counter(x["dropped"][kind]) + Counter(y["dropped"][kind])
            m["dropped"][kind] = dict(sorted(c.items()))
        merged[stage] = m
    return merged


def check_invariant(manifest: dict) -> list[str]:
    """Every violation of in = out + dropped, as readable lines (empty list: the manifest holds)."""
    problems = []
    for stage, st in manifest["stages"].items():
        for kind in ("documents", "images"):
            dropped = sum(st["dropped"][kind].values())
            if st["in"][kind] != st["out"][kind] + dropped:
                problems.append(f"{stage}/{kind}: in {st['in'][kind]} != out {st['out'][kind]} + dropped {dropped}")
    return problems


def new_manifest(config: dict, model: dict) -> dict:
    return {
        "stages": {s: empty_stage() for s in STAGES},
        "outputs": {"samples": 0, "files": []},
        "rejected": {"files": []},
        "schema_version": SCHEMA_VERSION,
        "tokenizer_hash": None,
        "tokenizer_path": "tokenizer",
        "config": config,
        "model": model,
        "durations": {},
        "shards": {"done": []},
        "groups": [],
    }


def load(directory: str | Path) -> dict | None:
    """DIR/manifest.json (DIR a local folder or a URI), None when there is none yet."""
    path = storage.join(directory, MANIFEST)
    if not storage.is_file(path):
        return None
    try:
        manifest = json.loads(storage.read_text(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); move it away to start the output afresh") from None
    # Anything else (null, a list, a dict without the run's keys) would read as "no run yet", and a
    # fresh run cleans files no manifest lists: refuse it instead of deleting published samples.
    if not isinstance(manifest, dict) or not {"shards", "groups", "outputs"} <= set(manifest):
        raise ValueError(f"{path} is not a curation manifest (a JSON object with shards, groups and outputs); "
                         "move it away to start the output afresh")
    return manifest


def save(directory: str | Path, manifest: dict) -> None:
    """Write DIR/manifest.json atomically: temp file + rename locally, a single PUT on a URI."""
    text = json.dumps(manifest, indent=2, sort_keys=False) + "\n"
    if storage.is_uri(directory):
        storage.write_text(storage.join(directory, MANIFEST), text)
        return
    directory = Path(directory)
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / MANIFEST)
