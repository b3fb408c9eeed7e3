"""Paths that may be local folders or object-storage URIs (s3://bucket/prefix), behind one small API.

Training reads curated data and writes its run folder, and serving reads a model, either on local
disk or in an S3-compatible object store. Everything that touches such a path goes through here, so
the rest of the code never splits URIs or builds filesystems itself.

S3 settings come from the environment, as the AWS tools read them: `AWS_ENDPOINT_URL_S3` or
`AWS_ENDPOINT_URL` (S3-compatible stores: MinIO, Ceph, moto), `AWS_REGION` / `AWS_DEFAULT_REGION`,
and credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` (/ `AWS_SESSION_TOKEN`) or the
SDK's default chain (`AWS_PROFILE`, ~/.aws, instance roles). Credentials never go into a message,
a manifest or a config file; they travel only inside the pickled filesystem object (so Ray
processes started before the variables were set can still reach the store).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from dreamcore.config import ConfigError

_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+://")
CACHE_ENV = "DREAMCORE_CACHE_DIR"  # where object-store folders are cached locally
CREDENTIALS_FIX = ("check the endpoint (AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3 for S3-compatible stores) "
                   "and credentials (AWS_ACCESS_KEY_ID + AWS_SECRET_ACCESS_KEY, or AWS_PROFILE)")


class StorageError(ConfigError):
    """An object-store path that cannot be used: a one-line message naming the path and the fix."""


def is_uri(path: str | Path) -> bool:
    """True for `scheme://...` (s3://, gs://, ...) other than file://; local paths and file:// are False."""
    text = str(path)
    return bool(_URI.match(text)) and not text.startswith("file://")


def resolve(path: str | Path) -> str:
    """A stable spelling of `path`: URIs without a trailing '/', local paths absolute."""
    text = str(path)
    if is_uri(text):
        return text.rstrip("/")
    return str(Path(text.removeprefix("file://")).expanduser().resolve())


def join(base: str | Path, *parts: str) -> str:
    """`base`/part/...: '/'-joined for URIs, os.path for local paths."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *parts])
    return str(Path(base, *parts))


def filesystem(path: str | Path) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) of a URI or local path.

    s3:// gets an S3FileSystem configured from the environment (module docstring); other schemes
    go to `pyarrow.fs.FileSystem.from_uri`; local paths to the local filesystem, absolute.
    """
    text = str(path)
    if not is_uri(text):
        return pafs.LocalFileSystem(), resolve(text)
    parsed = urlparse(text)
    if "@" in parsed.netloc:  # s3://KEY:SECRET@bucket/...: never echo it (messages and logs name URIs)
        raise StorageError(f"{parsed.scheme}://...@{parsed.netloc.rsplit('@', 1)[1]}{parsed.path}: a URI must not "
                           f"carry credentials; {CREDENTIALS_FIX}")
    if parsed.scheme in ("s3", "s3a"):
        endpoint, region, key, secret, token = _s3_settings()
        if not (region or endpoint):  # AWS itself: the bucket's own region, as from_uri would find
            region = _bucket_region(parsed.netloc)
        return _s3(endpoint, region, key, secret, token), f"{parsed.netloc}{parsed.path}".rstrip("/")
    try:
        return pafs.FileSystem.from_uri(text)
    except (OSError, ValueError) as e:
        raise StorageError(f"{text}: cannot open this storage URI ({_one_line(e)})") from None


# The environment that configures object-store access (endpoint, region, credentials, profile).
ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def environment() -> dict[str, str]:
    """This process's object-store settings (ENV_KEYS that are set), to hand to a process that lacks them.

    Secret: pass it inside a pickled function argument, never into a runtime_env, a file or a log.
    """
    return {k: os.environ[k] for k in ENV_KEYS if k in os.environ}


@contextlib.contextmanager
def using(env: dict[str, str] | None) -> Iterator[None]:
    """This process with `env` (another process's `environment()`) set, as it was afterwards: a Ray
    worker runs other tasks too. For workers of a Ray started before the settings existed."""
    env = env or {}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _s3_settings() -> tuple[str | None, str | None, str | None, str | None, str | None]:
    """(endpoint, region, access key, secret key, session token) from the environment."""
    env = os.environ.get
    endpoint = env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL")
    region = env("AWS_REGION") or env("AWS_DEFAULT_REGION")
    key, secret = env("AWS_ACCESS_KEY_ID"), env("AWS_SECRET_ACCESS_KEY")
    if not (key and secret):  # the SDK's default chain (profile, instance role) then
        key = secret = None
    return endpoint, region, key, secret, env("AWS_SESSION_TOKEN") if key else None


@lru_cache(maxsize=64)
def _bucket_region(bucket: str) -> str | None:
    try:
        return pafs.resolve_s3_region(bucket)
    except (OSError, ValueError):  # unknown here: the SDK default, and check_access reports what fails
        return None


@lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None, key: str | None, secret: str | None,
        token: str | None) -> pafs.S3FileSystem:
    """One S3FileSystem per setting (cached: building one is cheap, but data checks ask often)."""
    options: dict[str, Any] = {"connect_timeout": 5, "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=3)}
    if region:  # else the SDK's default (AWS config file, then us-east-1)
        options["region"] = region
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options |= {"endpoint_override": parsed.netloc, "scheme": parsed.scheme}
    if key and secret:
        options |= {"access_key": key, "secret_key": secret, "session_token": token}
    return pafs.S3FileSystem(**options)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def check_access(uri: str, what: str) -> None:
    """Fail with one line (the path and the fix) when `uri`'s bucket cannot be reached or does not exist.

    Called before any Ray work, so a wrong endpoint or missing credentials cost seconds, not a job.
    """
    if not is_uri(uri):
        return
    fs, path = filesystem(uri)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as e:
        raise StorageError(f"{what} {uri}: cannot reach the object store ({_one_line(e)}); {CREDENTIALS_FIX}") from None
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{what} {uri}: bucket {bucket!r} does not exist; create it or fix the URI")


def _info(path: str | Path) -> pafs.FileInfo:
    fs, inner = filesystem(path)
    try:
        return fs.get_file_info(inner)
    except OSError as e:
        raise StorageError(f"{path}: cannot read ({_one_line(e)}); {CREDENTIALS_FIX}") from None


def exists(path: str | Path) -> bool:
    return _info(path).type != pafs.FileType.NotFound


def is_file(path: str | Path) -> bool:
    return _info(path).type == pafs.FileType.File


def is_dir(path: str | Path) -> bool:
    """A folder; under a URI, any prefix that holds objects (object stores have no real folders)."""
    info = _info(path)
    if info.type == pafs.FileType.Directory:
        return True
    return is_uri(path) and info.type == pafs.FileType.NotFound and bool(list_files(path))


def list_files(path: str | Path, recursive: bool = True) -> list[str]:
    """The files under the folder `path`, as '/'-separated paths relative to it, sorted; [] if none."""
    fs, inner = filesystem(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=recursive, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"{path}: cannot list ({_one_line(e)}); {CREDENTIALS_FIX}") from None
    return sorted(i.path[len(inner):].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def list_dirs(path: str | Path) -> list[str]:
    """The names of the direct sub-folders of `path` (object stores: common prefixes), sorted."""
    fs, inner = filesystem(path)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=False, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"{path}: cannot list ({_one_line(e)}); {CREDENTIALS_FIX}") from None
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def read_text(path: str | Path) -> str:
    """A text file's content. A local file's errors are Python's own (they name the path); an
    object's are one StorageError line naming the URI and what to check."""
    fs, inner = filesystem(path)
    try:
        with fs.open_input_stream(inner) as f:
            return f.read().decode()
    except OSError as e:
        if not is_uri(path):
            raise
        raise StorageError(f"{path}: cannot read ({_one_line(e)}); {CREDENTIALS_FIX}") from None


def write_text(path: str | Path, text: str) -> None:
    fs, inner = filesystem(path)
    fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(inner) as f:
        f.write(text.encode())


def upload_dir(local: str | Path, uri: str) -> None:
    """Copy the local folder `local` to `uri` (replacing what was there, so no stale file survives)."""
    fs, inner = filesystem(uri)
    fs.delete_dir_contents(inner, missing_dir_ok=True)
    pafs.copy_files(str(local), inner, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local: str | Path) -> None:
    """Copy the folder `uri` into the local folder `local` (created if needed)."""
    fs, inner = filesystem(uri)
    Path(local).mkdir(parents=True, exist_ok=True)
    pafs.copy_files(inner, str(local), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())


def cache_root() -> Path:
    """$DREAMCORE_CACHE_DIR, else ~/.cache/dreamcore: where object-store folders are kept locally."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "dreamcore").expanduser()


def cached_copy(uri: str, cache_dir: str | Path | None = None) -> Path:
    """A local copy of the folder `uri`, downloaded once and reused while its objects stay the same.

    The cache entry is keyed by the URI and every object's name, size and modification time, so a
    re-exported model under the same URI is fetched again. Entries appear by an atomic rename: a
    crash mid-download or another process downloading the same folder never leaves a partial one.
    """
    fs, inner = filesystem(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(inner, recursive=True, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"{uri}: cannot list ({_one_line(e)}); {CREDENTIALS_FIX}") from None
    files = sorted((i.path[len(inner):], i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    if not files:
        raise StorageError(f"{uri}: no objects under this prefix; give the folder the job wrote")
    key = hashlib.sha256(repr((resolve(uri), files)).encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9_-]", "_", inner.rsplit("/", 1)[-1])
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "objects"
    target = root / f"{name}-{key}"
    if target.is_dir():
        return target
    root.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-partial-"))
    try:
        try:
            download_dir(uri, partial)
        except OSError as e:
            raise StorageError(f"{uri}: download failed ({_one_line(e)}); {CREDENTIALS_FIX}") from None
        try:
            os.rename(partial, target)
        except OSError:
            if not target.is_dir():  # not just another process winning the rename
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def arrow_path(path: str | Path) -> tuple[pafs.FileSystem | None, str]:
    """(filesystem, path) for pyarrow and Ray Data reads and writes: no filesystem for a local path
    (their default); for a URI this module's filesystem and the path inside it, so the caller's
    endpoint and credentials travel (pickled) to Ray's workers."""
    return filesystem(path) if is_uri(path) else (None, str(path))


def local_path(path: str | Path) -> str:
    """`path` itself when local; for a URI the folder's copy in this machine's cache (`cached_copy`:
    downloaded once per machine, shared by its processes)."""
    return str(cached_copy(str(path))) if is_uri(path) else str(path)


def makedirs(path: str | Path) -> None:
    """Create the local folder `path` (and parents); a no-op for URIs (object stores have no folders)."""
    if not is_uri(path):
        Path(str(path).removeprefix("file://")).mkdir(parents=True, exist_ok=True)


def move(src: str | Path, dst: str | Path) -> None:
    """Move the file `src` to `dst` on the same storage: an atomic os.replace locally, copy + delete
    on an object store (S3 has no rename; callers publish with a manifest written afterwards)."""
    if not is_uri(src):
        os.replace(str(src).removeprefix("file://"), str(dst).removeprefix("file://"))
        return
    fs, inner = filesystem(src)
    try:
        fs.move(inner, filesystem(dst)[1])
    except OSError as e:
        raise StorageError(f"{src}: cannot move to {dst} ({_one_line(e)}); {CREDENTIALS_FIX}") from None


def delete_file(path: str | Path) -> None:
    """Remove the file `path` if it is there (cleanup of what a killed job left)."""
    if not is_uri(path):
        Path(str(path).removeprefix("file://")).unlink(missing_ok=True)
        return
    fs, inner = filesystem(path)
    try:
        fs.delete_file(inner)
    except FileNotFoundError:
        pass


def delete_dir(path: str | Path) -> None:
    """Remove the folder `path` and everything under it (on object stores: every object under the
    prefix); a missing folder is fine, so cleanup can run twice."""
    if not is_uri(path):
        shutil.rmtree(str(path).removeprefix("file://"), ignore_errors=True)
        return
    fs, inner = filesystem(path)
    try:
        fs.delete_dir(inner)
    except FileNotFoundError:
        pass
