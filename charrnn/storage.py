"""Where runs live: a local directory or S3-compatible storage (AWS S3, MinIO, Ceph), via pyarrow.

URIs are `s3://bucket/prefix` or local paths; every function here takes either. How this process
reaches S3 (endpoint, region, credentials, bucket checks) is `s3.py`.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pyarrow.fs as pafs

from charrnn import s3, scratch
from charrnn.errors import StorageError


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI -> (filesystem, path inside it): `s3://b/p` -> (S3, "b/p"); local -> absolute path."""
    if is_s3(uri):
        bucket, key = s3.split(uri)
        return s3.filesystem(), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(local_path(uri))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def _wrap(uri: str, e: Exception) -> StorageError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "AWS Error ACCESS_DENIED" in msg or "InvalidAccessKeyId" in msg or "SignatureDoesNotMatch" in msg:
        hint = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    elif "NETWORK_CONNECTION" in msg or "Couldn't connect" in msg or "curlCode" in msg:
        hint = f"is the endpoint {s3.endpoint() or '(AWS default)'} reachable? (AWS_ENDPOINT_URL)"
    elif "NoSuchBucket" in msg or "NO_SUCH_BUCKET" in msg:
        hint = "the bucket does not exist"
    else:
        hint = ""
    return StorageError(f"{uri}: {msg}" + (f" ({hint})" if hint else ""))


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError as e:
        raise _wrap(uri, e) from None


def subdirs(uri: str, limit: int = 50) -> list[str]:
    """Names of the directories right under `uri` (S3: common prefixes), sorted, at most
    `limit` of them; [] when there is none or it cannot be listed."""
    fs, path = resolve(uri)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError:
        return []
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)[:limit]


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise StorageError(f"not found: {uri}") from None
    except OSError as e:
        raise _wrap(uri, e) from None


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def _aside(path: str, kind: str) -> str:
    """A sibling of local `path` to write (`tmp`) or move it (`old`) to before a rename puts the
    new one in place; `tidy_local` finds those that a killed process left by `_LEFTOVER`."""
    return f"{path}.{kind}-{uuid.uuid4().hex[:8]}"


_LEFTOVER = re.compile(r"(.+)\.(tmp|old)-[0-9a-f]{8}")


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object/file atomically: readers see the old or the new content, never half.

    An S3 PUT is atomic by itself; locally we write a temporary file and rename it over.
    """
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = _aside(path, "tmp")
            try:
                Path(tmp).write_bytes(data)
                os.replace(tmp, path)
            except BaseException:  # a full disk: no half-written file left beside the run
                Path(tmp).unlink(missing_ok=True)
                raise
        else:
            with fs.open_output_stream(path) as f:
                f.write(data)
    except OSError as e:
        raise _local_error(uri, e) from None


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def upload_dir(local_dir: str | Path, uri: str) -> None:
    """Copy a local directory to `uri`, all or nothing where it is new. Locally the copy is renamed
    into place, so it also replaces an existing directory all or nothing."""
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            tmp = _aside(path, "tmp")
            try:
                shutil.copytree(local_dir, tmp)
            except BaseException:  # a full disk, Ctrl-C: leave no half copy beside the run
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if os.path.exists(path):  # replacing: move the old one aside, then swap
                old = _aside(path, "old")
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        else:  # S3 has no rename: a new checkpoint cut short (Ctrl-C, a lost connection) is removed
            fresh = fs.get_file_info(path).type == pafs.FileType.NotFound
            try:
                pafs.copy_files(str(local_dir), path, destination_filesystem=fs)
            except BaseException:
                if fresh:
                    with contextlib.suppress(Exception):
                        fs.delete_dir(path)
                raise
    except OSError as e:
        raise _local_error(uri, e) from None


def tidy_local(uri: str) -> list[str]:
    """Finish what a killed process (SIGKILL, the OOM killer) left of `upload_dir` and
    `write_bytes` in local directory `uri`, whose run lock the caller holds; -> log lines.
    - `X.tmp-<hex>`, a copy not yet renamed into place: removed. A checkpoint is indexed, and a
      manifest names it, only once its copy is in place, so nothing recorded is lost.
    - `X.old-<hex>`, an X being replaced: removed when X is in place; otherwise the kill came
      between the two renames and it is the only complete X, so it becomes X again.
    S3 has neither: its writes are PUTs, not renames."""
    root, lines = local_path(uri), []
    if root is None or not root.is_dir():
        return lines
    for p in sorted(root.iterdir()):
        m = _LEFTOVER.fullmatch(p.name)
        if not m:
            continue
        target = root / m[1]
        try:
            if m[2] == "old" and not target.exists():
                os.replace(p, target)
                lines.append(f"restored {target.name} from {p.name}, left by a process killed "
                             "while replacing it")
                continue
            if p.is_dir():
                shutil.rmtree(p)
            else:
                p.unlink()
            lines.append(f"removed {p.name}, left half-written by a process that was killed")
        except OSError as e:
            lines.append(f"warning: cannot tidy {p}: {e.strerror or e}")
    return lines


def _local_error(uri: str, e: OSError) -> StorageError:
    """A local write's error without its temporary paths: `cannot write URI: No space left on
    device`. `shutil.copytree` raises one `shutil.Error` listing (src, dst, why) per file."""
    if isinstance(e, shutil.Error) and e.args and isinstance(e.args[0], list) and e.args[0]:
        return StorageError(f"cannot write {uri}: {e.args[0][0][2].split(': ', 1)[0].split('] ')[-1]}")
    if e.strerror and e.errno is not None:
        return StorageError(f"cannot write {uri}: {e.strerror}")
    return _wrap(uri, e)


def download_dir(uri: str, local_dir: str | Path, files: Sequence[str] | None = None) -> Path:
    """Copy directory `uri` (or only its `files`) into `local_dir`."""
    fs, path = resolve(uri)
    try:
        if files is None:
            pafs.copy_files(path, str(local_dir), source_filesystem=fs)
        for name in files or ():
            pafs.copy_files(f"{path}/{name}", str(Path(local_dir) / name), source_filesystem=fs)
    except FileNotFoundError:
        raise StorageError(f"not found: {uri}") from None
    except OSError as e:
        raise _wrap(uri, e) from None
    return Path(local_dir)


@contextlib.contextmanager
def local_copy(uri: str, kind: str = "copy",
               files: Sequence[str] | None = None) -> Iterator[Path]:
    """A local directory holding the files of directory `uri` while the block runs: the path
    itself when it is local, else a download into a scratch directory (`scratch.directory`),
    removed afterwards (a Serve replica that hot-swaps from S3 would otherwise fill its disk,
    one checkpoint a swap)."""
    local = local_path(uri)
    if local is not None:
        yield local
        return
    with scratch.directory(kind) as tmp:
        (tmp / "copy").mkdir()
        yield download_dir(uri, tmp / "copy", files)


def delete_dir(uri: str) -> None:
    _delete(uri, "delete_dir")


def delete_file(uri: str) -> None:
    _delete(uri, "delete_file")


def _delete(uri: str, method: str) -> None:
    """Delete with pyarrow's `method`; what is already gone is fine."""
    fs, path = resolve(uri)
    try:
        getattr(fs, method)(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise _wrap(uri, e) from None


def local_path(uri: str) -> Path | None:
    """The local path of a non-S3 URI (None for S3). `file://` is local; any other scheme is an
    error, so `gs://b/x` never becomes a directory named `gs:` under the working directory."""
    if is_s3(uri):
        return None
    if uri.startswith("file://"):
        uri = uri[len("file://"):]
    elif "://" in uri:
        raise StorageError(f"{uri}: unsupported storage scheme {uri.split('://', 1)[0]}://; use a "
                           "local path or s3://bucket/prefix (MinIO, Ceph and other S3-compatible "
                           "stores through AWS_ENDPOINT_URL)")
    return Path(uri).expanduser().resolve()


def check_storage(uri: str) -> None:
    """Fail fast, before training, when the storage cannot be written: missing bucket, wrong
    credentials or an unreachable endpoint each get a one-line error instead of a hang."""
    if is_s3(uri):
        s3.check_bucket(uri)
        return
    p = local_path(uri)
    if p.exists() and not p.is_dir():
        raise StorageError(f"storage {uri} is a file, not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        at = f" ({e.filename})" if e.filename and str(e.filename) != str(p) else ""
        raise StorageError(f"cannot create storage directory {uri}: {e.strerror}{at}") from None
    if not os.access(p, os.W_OK):
        raise StorageError(f"storage directory {uri} is not writable")
