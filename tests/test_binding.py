"""binding.py without a cluster: the rendezvous store and Serve's gRPC server take the node
address. (With a cluster: test_ray_train.py and test_serve.py watch every listening socket.)"""

import os

import psutil
import pytest
import torch
import torch.distributed as dist

from charrnn import binding


def _listening(port: int) -> set[str]:
    return {c.laddr.ip for c in psutil.Process().net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_rendezvous_store_binds_the_node_address_and_serves_the_process_group(monkeypatch):
    monkeypatch.setattr(binding.ray.util, "get_node_ip_address", lambda: "127.0.0.1")
    addr, port = binding._host_store_on_node_address()
    assert addr == "127.0.0.1" and _listening(port) == {"127.0.0.1"}
    monkeypatch.setitem(os.environ, "MASTER_ADDR", addr)
    monkeypatch.setitem(os.environ, "MASTER_PORT", str(port))
    dist.init_process_group("gloo", init_method="env://", rank=0, world_size=1)
    try:  # torch reused the store on `port` rather than opening its own on every interface
        t = torch.ones(3)
        dist.all_reduce(t)
        assert t.tolist() == [1.0, 1.0, 1.0]
        assert _listening(port) == {"127.0.0.1"}
    finally:
        dist.destroy_process_group()


def test_torch_config_uses_the_node_bound_backend():
    from ray.train.torch import TorchConfig
    config = binding.NodeBoundTorchConfig(backend="gloo")
    assert isinstance(config, TorchConfig) and config.backend_cls is binding._NodeBoundTorchBackend


@pytest.mark.parametrize("node_ip, expected", [("127.0.0.1", "127.0.0.1:0"),
                                               ("fd00::5", "[fd00::5]:0")])
def test_serve_grpc_server_binds_the_node_ip(monkeypatch, node_ip, expected):
    from ray.serve._private import replica
    calls = []
    monkeypatch.setattr(replica, "add_port_to_grpc_server", lambda server, a: calls.append(a))
    monkeypatch.setattr(binding.ray.util, "get_node_ip_address", lambda: node_ip)
    binding.bind_serve_grpc_to_node_ip()
    binding.bind_serve_grpc_to_node_ip()  # idempotent: wrapped once
    replica.add_port_to_grpc_server(None, "[::]:0")
    replica.add_port_to_grpc_server(None, "10.0.0.7:9000")  # an explicit address is kept
    assert calls == [expected, "10.0.0.7:9000"]
