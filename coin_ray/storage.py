"""One way to read and write files whether a path is local or ``s3://bucket/key``.

S3 uses pyarrow's S3 filesystem with the standard AWS credential chain; the endpoint
``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) is honoured, so a loopback S3 server
(moto, MinIO) works unchanged. Local writes are atomic (write to a temp file, rename), so
a killed run never leaves a half-written cache entry or manifest.

``locked`` is an exclusive lock named by a path: real on a local (or NFS) folder, nothing on
S3, which has no lock (see its docstring for what holds there).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import posixpath
import shutil
import tempfile
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a local path or an s3:// URI."""
    if is_s3(uri):
        return posixpath.join(uri.rstrip("/"), *parts)
    return str(Path(uri).joinpath(*parts))


@lru_cache(maxsize=8)
def _s3_filesystem(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        parsed = urlparse(endpoint)
        kwargs["endpoint_override"] = parsed.netloc or parsed.path
        kwargs["scheme"] = parsed.scheme or "https"
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow S3 filesystem for the current environment (endpoint and region honoured)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return _s3_filesystem(endpoint, region)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    uri = str(uri)
    if is_s3(uri):
        return s3_filesystem(), uri[len("s3://"):].rstrip("/")
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())


def to_uri(fs: pafs.FileSystem, path: str) -> str:
    """Inverse of ``resolve``: S3 paths get their scheme back (Ray Data drops it)."""
    if isinstance(fs, pafs.S3FileSystem) and not path.startswith("s3://"):
        return "s3://" + path.lstrip("/")
    return path


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write ``data`` to ``uri``; locally via a temp file and an atomic rename."""
    fs, path = resolve(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    with fs.open_output_stream(path) as f:
        f.write(data)


@contextlib.contextmanager
def locked(uri: str) -> Iterator[bool]:
    """Hold an exclusive lock named ``uri`` while the block runs; yields whether one is held.

    Local: ``flock`` on the file ``uri`` (created, and removed on release). The kernel drops
    the lock when its holder dies, so a killed run never leaves a stale lock behind; separate
    threads conflict too (each opens its own file description). A waiter that was granted the
    lock on a file its holder had just removed tries again on the new one.

    s3://: S3 has no lock (no exclusive create in pyarrow's client); yields False at once and
    the caller must be correct without it (atomic single-object writes still hold).
    """
    if is_s3(uri):
        yield False
        return
    path = Path(uri).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _lock_fd(path)
    try:
        yield True
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # before unlocking: a waiter then sees the inode gone and retries
        os.close(fd)  # releases the flock


def _lock_fd(path: Path) -> int:
    """An open descriptor of ``path`` holding its flock, on the inode the path names now."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            held = os.fstat(fd)
            now = os.stat(path)
            if (held.st_dev, held.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except FileNotFoundError:
            pass  # removed by the holder we waited for: lock the new file
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def list_files(uri: str, suffixes: tuple[str, ...] | None = None) -> list[str]:
    """All files under ``uri`` (recursive), sorted, as URIs of the same kind as ``uri``.

    ``suffixes`` filters by lower-cased extension (".jpg", ".png", ...). Hidden files and
    folders (a leading '.') are skipped.
    """
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"no such file or folder: {uri}")
    if info.type == pafs.FileType.File:
        infos = [info]
    else:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    out = []
    for item in infos:
        if item.type != pafs.FileType.File:
            continue
        rel = item.path[len(path):] if item.path.startswith(path) else item.base_name
        if any(part.startswith(".") for part in rel.split("/") if part):
            continue
        if suffixes and not item.path.lower().endswith(tuple(s.lower() for s in suffixes)):
            continue
        out.append(to_uri(fs, item.path))
    return sorted(out)


def delete(uri: str) -> None:
    """Delete a file or a folder tree; a missing path is not an error."""
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        fs.delete_dir(path)
    elif info.type == pafs.FileType.File:
        fs.delete_file(path)


def write_parquet(table: pa.Table, uri: str) -> None:
    """Write an Arrow table as one Parquet file (atomic locally)."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    write_bytes(uri, buf.getvalue())


def read_parquet(uri: str, schema: pa.Schema | None = None) -> pa.Table:
    """Read one Parquet file or a folder of them (e.g. Ray Data output) as one table."""
    fs, path = resolve(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        files = [f for f in list_files(uri, (".parquet",))]
        tables = [pq.read_table(io.BytesIO(read_bytes(f)), schema=schema) for f in files]
        if not tables:
            if schema is None:
                raise FileNotFoundError(f"no parquet files under {uri}")
            return schema.empty_table()
        return pa.concat_tables(tables)
    return pq.read_table(io.BytesIO(read_bytes(uri)), schema=schema)


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local folder tree to ``uri`` (local or s3://)."""
    local_dir = Path(local_dir)
    for file in sorted(local_dir.rglob("*")):
        if file.is_file():
            write_bytes(join(uri, *file.relative_to(local_dir).parts), file.read_bytes())


def local_copy(uri: str, cache_root: str | Path | None = None) -> Path:
    """A local folder or file holding ``uri``: the path itself when local, else a synced copy.

    Used for model checkpoints that libraries insist on reading from disk
    (``from_pretrained``). S3 folders are mirrored under ``cache_root`` (a temp dir by
    default), keyed by the URI.
    """
    if not is_s3(uri):
        return Path(uri).expanduser()
    root = Path(cache_root or Path(tempfile.gettempdir()) / "coin_ray_s3")
    target = root / uri[len("s3://"):].rstrip("/")
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(read_bytes(uri))
        return target
    if target.exists():
        shutil.rmtree(target)
    for file_uri in list_files(uri):
        rel = file_uri[len(uri.rstrip("/")) + 1:]
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(read_bytes(file_uri))
    return target
