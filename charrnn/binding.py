"""Where the processes of a job listen: on their node's Ray address, never on every interface.

Ray itself listens on the node address it was given (127.0.0.1 on a loopback-only machine, the
pod IP on Kubernetes). Two servers started under it do not follow that address; both bind the
wildcard address, which opens them on every interface of the host:

- torch's rendezvous store (`TCPStore`), hosted by rank 0 of a Ray Train worker group, listens
  on all interfaces whatever host it is given. `NodeBoundTorchConfig` has rank 0 bind the
  store's socket to its node address itself and hand it to torch (`master_listen_fd`);
  `init_process_group` then reuses that server (the store is multi-tenant, keyed by port).
- Ray Serve 2.60 starts an inter-deployment gRPC server in every replica on "[::]:0"
  (ray-project/ray#59908). Callers dial it at the replica's node IP, so
  `bind_serve_grpc_to_node_ip()` binds it there; `charrnn.serve` applies it at import, which
  happens in the replica before that server starts.

Tests watch every listening socket of a two-worker Train run (`test_ray_train.py`) and of a
Serve app (`test_serve.py`).
"""

from __future__ import annotations

import os
import socket

import ray
import torch.distributed as dist
from ray._common.network_utils import build_address, is_ipv6
from ray.train.torch import TorchConfig
from ray.train.torch.config import (
    _set_torch_distributed_env_vars,
    _setup_torch_process_group,
    _TorchBackend,
)

_rank0_store: tuple[socket.socket, dist.TCPStore] | None = None  # kept alive for the run


def _host_store_on_node_address() -> tuple[str, int]:
    """On rank 0: start the rendezvous store on this node's Ray address; -> (address, port)."""
    global _rank0_store
    addr = ray.util.get_node_ip_address()
    sock = socket.socket(socket.AF_INET6 if is_ipv6(addr) else socket.AF_INET)
    sock.bind((addr, 0))
    sock.listen(1024)
    port = sock.getsockname()[1]
    store = dist.TCPStore(addr, port, None, True, wait_for_workers=False, multi_tenant=True,
                          master_listen_fd=sock.fileno())
    _rank0_store = (sock, store)
    return addr, port


def _set_master(addr: str, port: int) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)


class _NodeBoundTorchBackend(_TorchBackend):
    """Ray's torch backend (gloo or NCCL, `env://` rendezvous), the store hosted as above."""

    def on_start(self, worker_group, backend_config: TorchConfig):
        addr, port = worker_group.execute_single(0, _host_store_on_node_address)
        worker_group.execute(_set_master, addr=addr, port=port)
        worker_group.execute(_set_torch_distributed_env_vars)
        ray.get([worker_group.execute_single_async(
            rank, _setup_torch_process_group, backend=backend_config.backend, world_rank=rank,
            world_size=len(worker_group), init_method="env://",
            timeout_s=backend_config.timeout_s) for rank in range(len(worker_group))])


class NodeBoundTorchConfig(TorchConfig):
    """`TorchConfig` for `TorchTrainer(torch_config=...)`; `backend` is set by TorchTrainer
    (gloo on CPU, NCCL on GPU) unless given."""

    @property
    def backend_cls(self):
        return _NodeBoundTorchBackend


def bind_serve_grpc_to_node_ip() -> None:
    """Make this process's Serve replicas bind their inter-deployment gRPC server to the node
    IP (where the proxy and other replicas dial it) instead of "[::]:0". Idempotent."""
    from ray.serve._private import replica
    original = replica.add_port_to_grpc_server
    if getattr(original, "charrnn_node_bound", False):
        return

    def add_port(server, address: str):
        if address.startswith("[::]:"):
            address = build_address(ray.util.get_node_ip_address(), address[len("[::]:"):])
        return original(server, address)

    add_port.charrnn_node_bound = True
    replica.add_port_to_grpc_server = add_port
