"""Curation, training checks and serving on S3-compatible object storage, against moto's real S3
server on loopback (a training run in the bucket, through a node's death: tests/test_multinode.py).

One moto server per module (port chosen by the OS); every test gets its own bucket and the AWS
environment a user would set (endpoint override, region, credentials) through monkeypatch. The
session's Ray was started before these variables existed, so the tests also check that the
settings reach Ray's processes without the environment (dreamcore/storage.py docstring).
"""

from __future__ import annotations

import socket
import sys
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _model_helpers import debug_model  # noqa: E402
from _train_helpers import TRAIN_MODEL_OVERRIDES  # noqa: E402

from dreamcore import storage  # noqa: E402


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's S3 server on 127.0.0.1 (a free port), for the whole module."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def bucket(moto_endpoint, monkeypatch, tmp_path) -> str:
    """A fresh bucket, with the environment pointing at moto (and the local cache in tmp_path)."""
    import boto3

    for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret")
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    name = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def _closed_port_url() -> str:
    """An endpoint nothing listens on: a port the OS just handed out and that was closed again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------------------------
# (a) the storage module


def test_folder_round_trip(bucket, tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("alpha")
    (src / "sub" / "b.bin").write_bytes(bytes(range(256)))
    uri = f"s3://{bucket}/runs/x/"
    assert storage.is_uri(uri) and not storage.is_uri(str(src)) and not storage.is_uri("file:///tmp")
    storage.upload_dir(src, uri)
    assert storage.list_files(uri) == ["a.txt", "sub/b.bin"]
    assert storage.list_dirs(f"s3://{bucket}/runs") == ["x"]
    assert storage.is_dir(uri) and storage.is_file(f"{uri}a.txt") and not storage.exists(f"{uri}nope")
    assert storage.read_text(f"s3://{bucket}/runs/x/a.txt") == "alpha"
    storage.download_dir(uri, tmp_path / "back")
    assert _tree(tmp_path / "back") == _tree(src)
    # Uploading again replaces the folder: no stale object survives.
    (src / "a.txt").unlink()
    storage.upload_dir(src, uri)
    assert storage.list_files(uri) == ["sub/b.bin"]


def test_unusable_bucket_or_endpoint_is_one_clear_line(bucket, monkeypatch):
    with pytest.raises(storage.StorageError) as missing:
        storage.check_access("s3://no-such-bucket/run", "--output")
    assert str(missing.value).splitlines() == [
        "--output s3://no-such-bucket/run: bucket 'no-such-bucket' does not exist; create it or fix the URI"]

    monkeypatch.setenv("AWS_ENDPOINT_URL", _closed_port_url())
    with pytest.raises(storage.StorageError) as unreachable:
        storage.check_access(f"s3://{bucket}/data", "--data")
    text = str(unreachable.value)
    assert len(text.splitlines()) == 1 and text.startswith(f"--data s3://{bucket}/data: cannot reach")
    assert "AWS_ENDPOINT_URL" in text and "testing-secret" not in text  # the fix, never the secret

    with pytest.raises(storage.StorageError) as inline:  # credentials in the URI itself: refused, not echoed
        storage.check_access(f"s3://AKIAX:hunter2@{bucket}/run", "--output")
    assert "hunter2" not in str(inline.value) and "must not carry credentials" in str(inline.value)


def test_train_refuses_an_unreachable_output_before_ray_starts(bucket, monkeypatch):
    from pipelines.train import load_train_config, train

    monkeypatch.setenv("AWS_ENDPOINT_URL", _closed_port_url())
    cfg = load_train_config("tiny", None, [f"model.{s}" for s in TRAIN_MODEL_OVERRIDES], workers=0)
    with pytest.raises(storage.StorageError, match=r"^--output s3://.*: cannot reach the object store"):
        train(cfg, f"s3://{bucket}/data", f"s3://{bucket}/run")


# (b) training with data, checkpoints, metrics and the export in the bucket, resumed from the
# bucket after a node dies: tests/test_multinode.py (its train scenario runs on moto too).


# ----------------------------------------------------------------------------------------------
# (c) serving: an s3:// checkpoint is downloaded once into the cache and served from there


def test_serve_checkpoint_from_s3_is_checked_once_and_downloaded_once_per_machine(bucket, tmp_path, monkeypatch):
    """The app builder checks the URI without downloading; each replica loads storage.local_path(uri):
    one download per machine (the cache), again only when the export changes."""
    from dreamcore.checkpoint import save_pretrained
    from pipelines.serve.app import check_checkpoint

    model, tokenizer = debug_model()
    save_pretrained(model, tokenizer, tmp_path / "model")
    uri = f"s3://{bucket}/runs/tiny/model"
    storage.upload_dir(tmp_path / "model", uri)

    downloads = []
    real_download = storage.download_dir
    monkeypatch.setattr(storage, "download_dir", lambda u, d: (downloads.append(u), real_download(u, d)))
    assert check_checkpoint(uri) == uri and downloads == []  # checked where the app is built, not fetched
    local = storage.local_path(uri)  # what LLMServer and ImageDecoder load, on their node
    assert Path(local).is_dir() and Path(local).is_relative_to(tmp_path / "cache")
    assert _tree(Path(local)) == _tree(tmp_path / "model")
    assert storage.local_path(uri) == local and downloads == [uri]  # the second replica reuses the copy

    # A re-exported model under the same URI is fetched again; local paths are unchanged.
    storage.write_text(f"{uri}/config.json", (tmp_path / "model" / "config.json").read_text() + "\n")
    assert storage.local_path(uri) != local and downloads == [uri, uri]
    assert check_checkpoint(str(tmp_path / "model")) == str((tmp_path / "model").resolve())
    assert storage.local_path(tmp_path / "model") == str(tmp_path / "model")
    from dreamcore.config import ConfigError

    for wrong in (f"s3://{bucket}/runs/none/model", f"s3://{bucket}/runs/tiny"):  # nothing there; a run folder
        with pytest.raises(ConfigError, match="has no config.json; pass the model/ folder"):
            check_checkpoint(wrong)
    assert downloads == [uri, uri]


# ----------------------------------------------------------------------------------------------
# (d) curation: --output s3://bucket/prefix, published group by group like a local folder


def _no_ray(monkeypatch) -> None:
    def started(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("pipelines.curate.job.ray_init", started)


def _keys(uri: str) -> list[str]:
    """Every object under `uri`, directory markers included (a stray `.tmp-.../` marker counts)."""
    import pyarrow.fs as pafs

    fs, inner = storage.filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    return sorted(i.path[len(inner):].lstrip("/") for i in infos)


def _published(uri: str) -> list[str]:
    """The data files a reader may find: samples, rejected rows and dedup hashes."""
    return [f for f in storage.list_files(uri) if f.split("/")[0] in ("samples", "rejected", "_state")]


def _manifest_files(m: dict) -> list[str]:
    return sorted(m["outputs"]["files"] + m["rejected"]["files"])


def test_curate_output_uri_is_checked_before_ray(bucket, monkeypatch, tmp_path, capsys):
    from dreamcore.cli import main
    from pipelines.curate.job import CurateError, check_output

    _no_ray(monkeypatch)
    with pytest.raises(CurateError) as missing:
        check_output("s3://no-such-bucket/cur")
    assert str(missing.value).splitlines() == [
        "--output s3://no-such-bucket/cur: bucket 'no-such-bucket' does not exist; create it or fix the URI"]
    shard = tmp_path / "s.jsonl"
    shard.write_text("")
    assert main(["curate", str(shard), "--output", "s3://no-such-bucket/cur"]) == 2
    err = capsys.readouterr().err
    assert err == f"dreamcore curate: {missing.value}\n"

    with pytest.raises(CurateError, match=r"^--output s3://\.\.\.@.*must not carry credentials") as inline:
        check_output(f"s3://AKIAX:hunter2@{bucket}/cur")
    assert "hunter2" not in str(inline.value)
    with pytest.raises(CurateError, match="give a folder inside the bucket"):
        check_output(f"s3://{bucket}")
    assert check_output(f"s3://{bucket}/cur/") == f"s3://{bucket}/cur"
    assert _keys(f"s3://{bucket}") == []  # checking writes nothing


def test_curate_to_s3_publishes_atomically_and_cleans_a_killed_group(bucket, monkeypatch, tmp_path):
    """Without Ray (empty shards publish on the driver): the group's files go through a temp prefix,
    the manifest names exactly the published files, and a group killed between its moves and the
    manifest (or a stray temp prefix) is removed by the next run, which then publishes it again."""
    from pipelines.curate import manifest as mf
    from pipelines.curate.job import curate

    _no_ray(monkeypatch)
    out = f"s3://{bucket}/cur"
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text("\n\n")
    m = curate([str(tmp_path / "a.jsonl")], out)
    assert m["rejected"]["files"] == ["rejected/rejected-g0000.parquet"] and mf.check_invariant(m) == []
    assert mf.load(out) == m and _published(out) == _manifest_files(m)
    assert not [k for k in _keys(out) if ".tmp-" in k]

    # A crash after g0001's files were moved into place, before its manifest was written.
    real_save = mf.save

    def crash_once(directory, manifest):
        monkeypatch.setattr(mf, "save", real_save)
        raise RuntimeError("killed before the manifest")

    monkeypatch.setattr(mf, "save", crash_once)
    with pytest.raises(RuntimeError, match="killed"):
        curate([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], out)
    assert "rejected/rejected-g0001.parquet" in _published(out)  # published files, not in the manifest
    assert mf.load(out) == m
    # And what a kill mid-write leaves: a temp prefix and an unlisted shard and hashes file.
    for stray in (".tmp-g0001-dead/samples/part.parquet", "samples/part-g0009-00000.parquet",
                  "_state/hashes-g0009-00000.parquet"):
        storage.write_text(f"{out}/{stray}", "half written")
    storage.write_text(f"{out}/_state/notes.txt", "not ours")

    again = curate([str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")], out)
    assert again["shards"]["skipped_on_resume"] == [str(tmp_path / "a.jsonl")]
    assert [g["id"] for g in again["groups"]] == ["g0000", "g0001"]
    assert _published(out) == sorted(_manifest_files(again) + ["_state/notes.txt"])
    assert not [k for k in _keys(out) if ".tmp-" in k]
    assert mf.load(out) == again and "testing-secret" not in storage.read_text(f"{out}/manifest.json")


def _corpus(folder: Path, base: str, n_docs: int = 20) -> list[Path]:
    """`n_docs` documents in two shards, 1-2 loopback images each; the last one repeats the first
    document's image under another URL, so dedup (in the second group) drops it against the hashes
    the first group published."""
    from _curate_helpers import mmc4_doc, write_jsonl

    docs = [mmc4_doc(f"http://ex.com/{i}", [f"{base}/img/{i}.jpg"] + ([f"{base}/img/{i}b.jpg"] if i % 3 == 0 else []),
                     offset=i) for i in range(n_docs - 1)]
    docs.append(mmc4_doc("http://ex.com/dup", [f"{base}/img/dup.jpg"], offset=3))
    folder.mkdir()
    half = n_docs // 2
    return [write_jsonl(folder / "s1.jsonl", docs[:half]), write_jsonl(folder / "s2.jsonl", docs[half:])]


def _corpus_images(n_docs: int = 20) -> dict[str, bytes]:
    from _curate_helpers import image_bytes

    images = {f"{i}.jpg": image_bytes("JPEG", (64, 48), i) for i in range(n_docs)}
    images |= {f"{i}b.jpg": image_bytes("JPEG", (64, 48), 100 + i) for i in range(n_docs)}
    return images | {"dup.jpg": images["0.jpg"]}


def _curate_cfg():
    from pipelines.curate.config import embedded

    cfg = embedded()
    cfg.crawl.timeout_s, cfg.crawl.retries, cfg.crawl.backoff_s = 2.0, 1, 0.05
    cfg.progress = False
    cfg.shards_per_commit = 1  # two groups: the second dedups against the first one's published hashes
    cfg.filter.dedup_exact = True
    return cfg


@pytest.mark.e2e
def test_curate_to_s3_matches_local_resumes_and_trains(ray_session, moto_endpoint, bucket, tmp_path):
    from _curate_helpers import CaseServer

    from pipelines.curate import manifest as mf
    from pipelines.curate.job import curate
    from pipelines.train.data import check_data_folder

    out = f"s3://{bucket}/cur"
    with CaseServer(_corpus_images()) as srv:
        shards = [str(s) for s in _corpus(tmp_path / "in", srv.base)]
        m = curate(shards, out, _curate_cfg())
        local = curate(shards, tmp_path / "local", _curate_cfg())

    assert mf.check_invariant(m) == [] and mf.load(out) == m
    assert [g["id"] for g in m["groups"]] == ["g0000", "g0001"]
    assert m["stages"]["read"]["in"] == {"documents": 20, "images": 27}
    assert m["stages"]["dedup"]["dropped"]["images"] == {"duplicate_image": 1}, m["stages"]["dedup"]
    assert m["outputs"]["samples"] > 0 and m["stages"]["write"]["out"]["images"] > 0
    assert m["stages"] == local["stages"] and m["outputs"] == local["outputs"]  # same counts, same file names
    assert m["rejected"] == local["rejected"] and m["tokenizer_hash"] == local["tokenizer_hash"]
    # Exactly the listed files are published, all present; no temp prefix is left; no secret.
    assert _published(out) == sorted(_manifest_files(m) + [f"_state/{f}" for f in
                                                           storage.list_files(f"{out}/_state")])
    assert all(f.startswith("hashes-g000") for f in storage.list_files(f"{out}/_state"))
    assert not [k for k in _keys(out) if ".tmp-" in k]
    assert storage.list_files(f"{out}/tokenizer") == storage.list_files(tmp_path / "local" / "tokenizer")
    text = storage.read_text(f"{out}/manifest.json")
    assert "testing-secret" not in text and moto_endpoint not in text

    # The trainer reads the bucket folder as it is.
    model_cfg = _curate_cfg().model_config()
    files = check_data_folder(out, model_cfg)
    assert sorted(f.removeprefix(f"{out}/") for f in files) == sorted(m["outputs"]["files"])

    # The same command again: every shard is skipped, nothing in the bucket changes.
    before = storage.list_files(out)
    again = curate(shards, out, _curate_cfg())
    assert again["shards"]["skipped_on_resume"] == sorted(shards) and again["outputs"] == m["outputs"]
    assert storage.list_files(out) == before and again["groups"] == m["groups"]
