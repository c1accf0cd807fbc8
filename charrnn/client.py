"""HTTP client of the Serve app, for `jobs/generate.py --serve-url` and the benchmarks.

Each prompt goes as its own request (seed + i for prompt i, as offline), many at once, so the
server's batcher can gather them into shared generation batches.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import requests

from charrnn import runlog, urls
from charrnn.errors import CharrnnError
from charrnn.generate import Generator
from charrnn.sampling import SampleParams

T, R = TypeVar("T"), TypeVar("R")
RETRY_STATUSES = (429, 502, 503, 504)
RETRY_WAITS_S = (0.5, 1.0, 2.0, None)  # None: the last attempt
RETRY_AFTER_MAX_S = 30.0  # the most a server's Retry-After makes one wait
PROGRESS_EVERY_S = 10.0


def retry_after(r: requests.Response) -> float:
    """An answer's Retry-After in seconds, at most RETRY_AFTER_MAX_S; 0 when it has none (or
    gives an HTTP date, or nonsense)."""
    try:
        s = float(r.headers.get("Retry-After", 0))
    except ValueError:
        return 0.0
    return min(s, RETRY_AFTER_MAX_S) if s > 0 else 0.0  # NaN > 0 is False


def request_body(prompt: str, p: SampleParams, oov: str = "error") -> dict:
    body = {"prompt": prompt, "max_chars": p.max_new_chars, "temperature": p.temperature,
            "top_p": p.top_p, "greedy": p.greedy, "seed": p.seed, "oov": oov}
    if p.top_k:
        body["top_k"] = p.top_k
    return body


def generate_remote(url: str, prompts: list[str], params: SampleParams, token: str | None = None,
                    concurrency: int = 32, timeout: float = 300,
                    oov: str = "error") -> tuple[list[str], dict]:
    """All completions, in prompt order, and the `model` of the first answer."""
    results = list(iter_remote(url, prompts, params, token, concurrency, timeout, oov))
    return [c for c, _ in results], (results[0][1] if results else {})


def iter_remote(url: str, prompts: list[str], params: SampleParams, token: str | None = None,
                concurrency: int = 32, timeout: float = 300,
                oov: str = "error") -> Iterator[tuple[str, dict]]:
    """(completion, model) per prompt, in prompt order, each as soon as it and those before it
    are back: a long batch writes as it goes, and an error or Ctrl-C at prompt 2,000 keeps the
    1,999 before it. Progress goes to stderr every `PROGRESS_EVERY_S`."""
    # Checked here, not as a traceback from a worker thread.
    bad = urls.problem(url, credentials="the Serve app takes a bearer token: --token")
    if bad:
        raise CharrnnError(f"--serve-url {urls.redacted(url)} {bad}")
    # As the server reads its own (`api.api_token`): stripped, UTF-8 (requests would send text
    # as Latin-1, and fail on anything outside it).
    token = (token or "").strip()
    headers = {"Authorization": b"Bearer " + token.encode()} if token else {}
    session = requests.Session()

    def post(body: dict) -> requests.Response:
        """POST /generate; a refused connection or a 429/502/503/504 (a replica restarting, a
        redeploy, Serve shedding load) is retried after 0.5, 1 and 2 s, or after the answer's
        Retry-After when that is longer (Serve's backpressure sends one)."""
        for wait in RETRY_WAITS_S:
            try:
                r = session.post(url.rstrip("/") + "/generate", json=body, headers=headers,
                                 timeout=timeout)
                if r.status_code not in RETRY_STATUSES or wait is None:
                    return r
                wait = max(wait, retry_after(r))
            except requests.ConnectionError as e:
                if wait is None:
                    errno = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(e))
                    raise CharrnnError(f"cannot reach {url} ({errno.group(1) if errno else e}) "
                                       f"after {len(RETRY_WAITS_S)} attempts; is the Serve app "
                                       "running there?") from None
            except requests.RequestException as e:  # a timeout: the server may still be working
                raise CharrnnError(f"no answer from {url}: {e}") from None
            time.sleep(wait)
        raise AssertionError("unreachable")

    def one(item):
        i, (prompt, p) = item
        r = post(request_body(prompt, p, oov))
        if r.status_code != 200:
            try:
                msg = r.json().get("error", r.text)
            except (ValueError, AttributeError):  # not JSON, or JSON but not an object
                msg = r.text
            which = f" to prompt {i + 1:,} of {len(prompts):,}" if len(prompts) > 1 else ""
            tries = (f" {len(RETRY_WAITS_S)} times" if r.status_code in RETRY_STATUSES else "")
            raise CharrnnError(f"{url} answered {r.status_code}{tries}{which}: {msg.strip()}")
        try:
            data = r.json()
            return data["completions"][0], data["model"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise CharrnnError(f"{url} answered 200 without completions: is it a charrnn Serve "
                               "app?") from None

    rows = Generator.row_params(params, len(prompts))
    started, every = time.monotonic(), runlog.Every(PROGRESS_EVERY_S)
    items = list(enumerate(zip(prompts, rows)))
    for done, result in enumerate(ordered_map(one, items, concurrency), 1):
        yield result
        if done < len(prompts) and every.due():
            runlog.note(f"  {done:,} of {len(prompts):,} prompts done "
                        f"({done / (time.monotonic() - started):,.1f}/s)")


def ordered_map(fn: Callable[[T], R], items: Sequence[T], workers: int) -> Iterator[R]:
    """`fn` over `items` on up to `workers` threads, results yielded in order; an exception is
    raised where its item's result would be. Leaving early (an error, Ctrl-C, a closed stdout)
    starts no further item and waits for none in flight: the threads are daemons. With a
    ThreadPoolExecutor, Ctrl-C against a server that had stopped answering waited out every
    request's timeout (its workers are joined at exit), and a second Ctrl-C aborted the process
    in C++ ("terminate called after throwing ... KeyboardInterrupt")."""
    results: list = [None] * len(items)
    ready = [threading.Event() for _ in items]
    order = iter(range(len(items)))
    lock, stop = threading.Lock(), threading.Event()

    def work() -> None:
        while not stop.is_set():
            with lock:
                i = next(order, None)
            if i is None:
                return
            try:
                results[i] = (True, fn(items[i]))
            except BaseException as e:  # noqa: BLE001  (re-raised in the caller's thread)
                results[i] = (False, e)
            ready[i].set()

    for _ in range(min(workers, len(items))):
        threading.Thread(target=work, daemon=True, name="charrnn-client").start()
    try:
        for i in range(len(items)):
            ready[i].wait()
            (ok, value), results[i] = results[i], None
            if not ok:
                raise value
            yield value
    finally:
        stop.set()
