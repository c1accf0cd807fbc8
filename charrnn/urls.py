"""The http(s) URLs a user gives: a corpus to download, an S3 endpoint, a Serve app.

Checked before use, in one place. A malformed URL raised ValueError or `http.client.InvalidURL`
from inside urllib or botocore (a traceback, or a wrong hint such as "run again to retry"), and
`http://user:pass@host/` sent "user:pass@host" to DNS as a host name. Credentials in a URL are
refused rather than supported: these URLs are logged, and the corpus and S3 endpoint are saved in
every checkpoint's config, where a password must never go (S3 keys come from AWS_ACCESS_KEY_ID
and AWS_SECRET_ACCESS_KEY, a Serve token from --token or CHARRNN_API_TOKEN).
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

SAVED = "it would be logged and saved in checkpoints"
S3_KEYS = f"{SAVED}: give S3 credentials in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"


def problem(url: str, path: bool = True, credentials: str = "") -> str | None:
    """What is wrong with `url` as http(s)://HOST[:PORT][/PATH] (without /PATH when `path` is
    False), said to follow the URL in a message; None when nothing is. `credentials` says where
    they go instead."""
    form = "http(s)://HOST[:PORT]" + ("/PATH" if path else "")
    if any(c.isspace() or not c.isprintable() for c in url):
        return "contains a space or a control character (percent-encode it: %20 for a space)"
    try:
        u = urlsplit(url)
        u.port  # noqa: B018  (parses the port: out of range or not a number raises)
    except ValueError as e:
        return f"is not a valid URL ({e}); expected {form}"
    if u.scheme not in ("http", "https") or not u.hostname:
        return f"is not a valid URL; expected {form}"
    if "@" in u.netloc:
        return "carries a user name or password" + (f"; {credentials}" if credentials else "")
    if not path and (u.path not in ("", "/") or u.query or u.fragment):
        return f"has a path; expected {form}"
    return None


def redacted(url: str) -> str:
    """`url` for a message: any user name and password before the host become `***`; an empty
    one is `''` (it read "--serve-url  is not a valid URL")."""
    if not url:
        return "''"
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@", r"\1***@", url)
