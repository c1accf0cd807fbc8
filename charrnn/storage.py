"""Where runs live: a local directory or S3-compatible storage (AWS S3, MinIO, Ceph), via pyarrow.

URIs are `s3://bucket/prefix` or local paths. The S3 endpoint and region come from the run config
or the standard variables (AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL; AWS_REGION). Credentials
are never passed around: pyarrow and boto3 read AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or
~/.aws, or instance metadata) in whichever process touches storage, so they never enter a
config, a checkpoint, a metric or a log.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from charrnn.errors import StorageError

# Set once from the run config by the entry point; env variables are the fallback.
_settings = {"endpoint_url": "", "region": ""}


def configure(endpoint_url: str = "", region: str = "") -> None:
    """Use this S3 endpoint/region for every later `s3://` access in this process."""
    _settings.update(endpoint_url=endpoint_url, region=region)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def s3_endpoint() -> str:
    return (_settings["endpoint_url"] or os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL") or "")


def s3_region() -> str:
    return (_settings["region"] or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


def s3_filesystem() -> pafs.S3FileSystem:
    kwargs: dict = dict(
        region=s3_region(),
        connect_timeout=5, request_timeout=30,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )
    endpoint = s3_endpoint()
    if endpoint:
        u = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs.update(endpoint_override=u.netloc, scheme=u.scheme)
    return pafs.S3FileSystem(**kwargs)


def s3_client():
    """A boto3 S3 client on the configured endpoint, for what pyarrow does not offer: error codes
    and conditional writes. A fresh session each time: no cached credentials."""
    import boto3
    import botocore.config
    # Ray workers log at INFO: a fresh session would say "Found credentials in ..." each time.
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
    return boto3.session.Session().client(
        "s3", endpoint_url=s3_endpoint() or None, region_name=s3_region(),
        config=botocore.config.Config(connect_timeout=5, read_timeout=10,
                                      retries={"max_attempts": 2}))


def s3_error_code(e) -> str:
    """The S3 error code of a botocore ClientError ("" when it has none)."""
    return e.response.get("Error", {}).get("Code", "")


_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")  # what S3 clients accept (AWS itself is stricter)


def s3_split(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key"); a URI without a usable bucket is an error."""
    bucket, _, key = uri[len("s3://"):].rstrip("/").partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise StorageError(f"{uri}: an S3 URI needs a bucket name (letters, digits, '.', '-', '_') "
                           "right after s3://, e.g. s3://bucket/prefix")
    return bucket, key


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """URI -> (filesystem, path inside it): `s3://b/p` -> (S3, "b/p"); local -> absolute path."""
    if is_s3(uri):
        bucket, key = s3_split(uri)
        return s3_filesystem(), f"{bucket}/{key}".rstrip("/")
    return pafs.LocalFileSystem(), str(local_path(uri))


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


def _wrap(uri: str, e: Exception) -> StorageError:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "AWS Error ACCESS_DENIED" in msg or "InvalidAccessKeyId" in msg or "SignatureDoesNotMatch" in msg:
        hint = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    elif "NETWORK_CONNECTION" in msg or "Couldn't connect" in msg or "curlCode" in msg:
        hint = f"is the endpoint {s3_endpoint() or '(AWS default)'} reachable? (AWS_ENDPOINT_URL)"
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


def write_bytes(uri: str, data: bytes) -> None:
    """Write a whole object/file atomically: readers see the old or the new content, never half.

    An S3 PUT is atomic by itself; locally we write a temporary file and rename it over.
    """
    fs, path = resolve(uri)
    try:
        if isinstance(fs, pafs.LocalFileSystem):
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
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
            tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                shutil.copytree(local_dir, tmp)
            except BaseException:  # a full disk, Ctrl-C: leave no half copy beside the run
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            if os.path.exists(path):  # replacing: move the old one aside, then swap
                old = f"{path}.old-{uuid.uuid4().hex[:8]}"
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
def local_copy(uri: str, prefix: str = "charrnn-",
               files: Sequence[str] | None = None) -> Iterator[Path]:
    """A local directory holding the files of directory `uri` while the block runs: the path
    itself when it is local, else a download into a temporary directory, removed afterwards (a
    Serve replica that hot-swaps from S3 would otherwise fill its disk, one checkpoint a swap)."""
    local = local_path(uri)
    if local is not None:
        yield local
        return
    tmp = tempfile.mkdtemp(prefix=prefix)
    try:
        yield download_dir(uri, tmp, files)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    if not is_s3(uri):
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
        return
    import botocore.exceptions
    bucket, _ = s3_split(uri)
    client = s3_client()
    try:
        client.head_bucket(Bucket=bucket)
    except botocore.exceptions.NoCredentialsError:
        raise StorageError(f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY)") from None
    except botocore.exceptions.EndpointConnectionError:
        raise StorageError(f"{uri}: cannot reach the S3 endpoint {s3_endpoint() or '(AWS)'} "
                           "(check AWS_ENDPOINT_URL / run.s3_endpoint_url)") from None
    except botocore.exceptions.ClientError as e:
        code = s3_error_code(e)
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"{uri}: bucket {bucket!r} does not exist") from None
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            raise StorageError(f"{uri}: access to bucket {bucket!r} denied ({code}); check "
                               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
        raise StorageError(f"{uri}: S3 error {code}: {e}") from None
