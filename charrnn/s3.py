"""How this process reaches S3-compatible storage (AWS S3, MinIO, Ceph): the endpoint and region,
pyarrow's filesystem and a boto3 client on them, bucket names, and the check that a bucket can be
used. `storage.py` does the reading and writing, on S3 or a local directory alike.

The endpoint and region come from the run config (`configure`) or the standard variables
(AWS_ENDPOINT_URL_S3, then AWS_ENDPOINT_URL; AWS_REGION). Credentials are never passed around:
pyarrow and boto3 read AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or ~/.aws, or instance metadata)
in whichever process touches storage, so they never enter a config, a checkpoint, a metric or a log.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from charrnn import urls
from charrnn.errors import StorageError

# Set once from the run config by the entry point; env variables are the fallback.
_settings = {"endpoint_url": "", "region": ""}


def configure(endpoint_url: str = "", region: str = "") -> None:
    """Use this S3 endpoint/region for every later `s3://` access in this process."""
    _settings.update(endpoint_url=endpoint_url, region=region)


def endpoint() -> str:
    """The endpoint URL, "" for AWS itself. A malformed one is a StorageError naming where it was
    set (it was a ValueError or botocore traceback, and pyarrow took `host:9000` as https)."""
    for where, url in (("run.s3_endpoint_url", _settings["endpoint_url"]),
                       ("AWS_ENDPOINT_URL_S3", os.environ.get("AWS_ENDPOINT_URL_S3")),
                       ("AWS_ENDPOINT_URL", os.environ.get("AWS_ENDPOINT_URL"))):
        if url:
            bad = urls.problem(url, path=False, credentials=urls.S3_KEYS)
            if bad:
                raise StorageError(f"the S3 endpoint {where}={urls.redacted(url)} {bad}")
            return url
    return ""


def region() -> str:
    return (_settings["region"] or os.environ.get("AWS_REGION")
            or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")


def filesystem() -> pafs.S3FileSystem:
    kwargs: dict = dict(
        region=region(),
        connect_timeout=5, request_timeout=30,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=3),
    )
    url = endpoint()
    if url:
        u = urlsplit(url)
        kwargs.update(endpoint_override=u.netloc, scheme=u.scheme)
    return pafs.S3FileSystem(**kwargs)


def client():
    """A boto3 S3 client on the configured endpoint, for what pyarrow does not offer: error codes
    and conditional writes. A fresh session each time: no cached credentials."""
    import boto3
    import botocore.config
    # Ray workers log at INFO: a fresh session would say "Found credentials in ..." each time.
    logging.getLogger("botocore.credentials").setLevel(logging.WARNING)
    return boto3.session.Session().client(
        "s3", endpoint_url=endpoint() or None, region_name=region(),
        config=botocore.config.Config(connect_timeout=5, read_timeout=10,
                                      retries={"max_attempts": 2}))


def error_code(e) -> str:
    """The S3 error code of a botocore ClientError ("" when it has none)."""
    return e.response.get("Error", {}).get("Code", "")


_BUCKET = re.compile(r"[A-Za-z0-9._-]{1,255}")  # what S3 clients accept (AWS itself is stricter)


def split(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/key` -> ("bucket", "some/key"); a URI without a usable bucket is an error."""
    bucket, _, key = uri[len("s3://"):].rstrip("/").partition("/")
    if not _BUCKET.fullmatch(bucket):
        raise StorageError(f"{uri}: an S3 URI needs a bucket name (letters, digits, '.', '-', '_') "
                           "right after s3://, e.g. s3://bucket/prefix")
    return bucket, key


def check_bucket(uri: str) -> None:
    """`s3://bucket/...` -> a one-line error when the bucket is missing, the credentials are
    wrong or the endpoint cannot be reached (instead of a hang or a traceback in training)."""
    import botocore.exceptions
    bucket, _ = split(uri)
    c = client()
    try:
        c.head_bucket(Bucket=bucket)
    except botocore.exceptions.NoCredentialsError:
        raise StorageError(f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY)") from None
    except botocore.exceptions.EndpointConnectionError:
        raise StorageError(f"{uri}: cannot reach the S3 endpoint {endpoint() or '(AWS)'} "
                           "(check AWS_ENDPOINT_URL / run.s3_endpoint_url)") from None
    except botocore.exceptions.ClientError as e:
        code = error_code(e)
        if code in ("404", "NoSuchBucket"):
            raise StorageError(f"{uri}: bucket {bucket!r} does not exist") from None
        if code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
            raise StorageError(f"{uri}: access to bucket {bucket!r} denied ({code}); check "
                               "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY") from None
        raise StorageError(f"{uri}: S3 error {code}: {e}") from None
