"""Services the integration tests start and stop themselves, all on 127.0.0.1.

- `moto_server`: an S3-compatible HTTP server standing in for MinIO; the code under test talks
  to it through boto3 / pyarrow exactly as to MinIO.
- `ray_head`: `ray start --head` on loopback with token authentication (a fresh random token,
  passed through RAY_AUTH_TOKEN so ~/.ray is untouched); it stops alone, never by `ray stop`.
- `watch_listeners`: every listening socket of Ray's processes that is not on loopback.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BIN = Path(sys.executable).parent


LOOPBACK = ("127.", "::1", "::ffff:127.")


def ray_listeners_off_loopback() -> set[str]:
    """Listening TCP sockets of Ray's processes (raylet, GCS, workers, replicas, this driver)
    bound to anything but loopback, wildcards included: "ADDRESS:PORT command"."""
    import psutil
    found = set()
    for c in psutil.net_connections("tcp"):
        if c.status != psutil.CONN_LISTEN or c.pid is None or c.laddr.ip.startswith(LOOPBACK):
            continue
        try:
            cmd = " ".join(psutil.Process(c.pid).cmdline())
        except psutil.Error:
            continue
        if "ray" in cmd:
            found.add(f"{c.laddr.ip}:{c.laddr.port} {cmd[:60]}")
    return found


@contextlib.contextmanager
def watch_listeners(interval: float = 0.5):
    """Yields a set that collects `ray_listeners_off_loopback()` while the block runs."""
    seen: set[str] = set()
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            seen.update(ray_listeners_off_loopback())
            stop.wait(interval)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
        return True
    return False


@contextlib.contextmanager
def moto_server():
    """Yields the env (endpoint, region, credentials) of a fresh S3 server on loopback.

    Like MinIO, it checks signatures: after the first three (unauthenticated) requests, which
    create an IAM user and its access key, every request must be signed with that key. Tests
    grep for the key to show it never leaks into checkpoints, logs or metrics.
    """
    import boto3
    port = free_port()
    exe = shutil.which("moto_server", path=str(BIN)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            env={**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "3"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _port_open(port), 30, "moto_server")
        endpoint = f"http://127.0.0.1:{port}"
        iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        iam.create_user(UserName="charrnn")
        iam.put_user_policy(UserName="charrnn", PolicyName="all", PolicyDocument=json.dumps(
            {"Version": "2012-10-17",
             "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        key = iam.create_access_key(UserName="charrnn")["AccessKey"]
        yield {"AWS_ENDPOINT_URL": endpoint, "AWS_REGION": "us-east-1",
               "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
               "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}
    finally:
        proc.terminate()
        proc.wait(10)


def s3_client(env: dict):
    import boto3
    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name=env["AWS_REGION"],
                        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])


def bucket_keys(env: dict, bucket: str) -> list[str]:
    """The bucket's keys, listed only: safe while a run writes and prunes (a key listed, then
    pruned before its GET, failed `bucket_objects` with NoSuchKey)."""
    c = s3_client(env)
    return [o["Key"] for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket)
            for o in page.get("Contents", [])]


def bucket_objects(env: dict, bucket: str) -> dict[str, bytes]:
    c = s3_client(env)
    return {k: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in bucket_keys(env, bucket)}


@contextlib.contextmanager
def ray_head(extra_env: dict | None = None, num_cpus: int = 2):
    """`ray start --head` on loopback with token auth; yields (env for clients, dashboard URL,
    GCS address).

    The head stops alone: `ray stop` would stop every Ray process of the machine, including an
    in-process cluster the calling test module still holds, whose driver (pytest itself) then
    exits with status 1 without a word. So the head runs with `--block` in its own session and
    its own temp dir (its `ray_current_cluster` file stays there, and no later `ray.init()`
    finds a dead address), and teardown ends exactly its process tree.
    """
    import psutil
    port, dash = free_port(), free_port()
    env = {**os.environ, **(extra_env or {}), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16),
           # `python` in a job's entrypoint is this venv's, as in an activated venv or image
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    # Every port free, so this head can run beside another local cluster (say, an in-process
    # one a test module holds): otherwise its dashboard agent cannot bind the default port and
    # the head never accepts job submissions ("No available agent").
    ports = {f"--{flag}={free_port()}" for flag in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "ray-client-server-port", "node-manager-port",
        "object-manager-port")}
    # A short path: Ray's Unix sockets live under it (108 bytes at most on Linux).
    temp = tempfile.mkdtemp(prefix="rayhead-", dir="/tmp")
    start = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
             f"--port={port}", f"--num-cpus={num_cpus}", "--num-gpus=0",
             "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
             "--disable-usage-stats", f"--temp-dir={temp}", *sorted(ports)]
    log = Path(temp) / "ray-start.log"

    def up():
        if head.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with {head.returncode}:\n"
                               + log.read_text()[-3000:])
        return _port_open(dash)

    try:
        with open(log, "w") as out:  # the child keeps its own copy of the descriptor
            head = subprocess.Popen(start, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            wait_for(up, 120, "the Ray dashboard")
            yield env, f"http://127.0.0.1:{dash}", f"127.0.0.1:{port}"
        finally:
            _stop_tree(psutil, head)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _stop_tree(psutil, proc: subprocess.Popen, grace: float = 30) -> None:
    """SIGTERM to `ray start --block` (it stops the processes it started), then SIGKILL to
    whatever of its tree is left after `grace` seconds (workers the raylet started, say)."""
    try:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    proc.terminate()
    _, alive = psutil.wait_procs(tree, timeout=grace)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=10)
    proc.wait(10)
