"""The Serve app as the Serve benches measure it: an in-process Ray cluster of this machine alone,
Serve's HTTP proxy on 127.0.0.1, one application at route `/`."""

import contextlib

import requests


@contextlib.contextmanager
def serve_app(app_args: dict, name: str):
    """Yields the app's URL once GET /healthz answers; Serve and Ray stop at the end.
    `app_args` are `build_app`'s (the Serve config's `args`)."""
    import ray
    from ray import serve

    from charrnn.serve import build_app
    from tests.services import free_port, wait_for
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_args), name=name, route_prefix="/", blocking=False)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: requests.get(url + "/healthz", timeout=1).ok, 120, "serve")
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()
