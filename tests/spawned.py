"""What the tests that spawn a gloo world share: a free port, and a rank's environment."""

from __future__ import annotations

import os
import socket

import torch


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rank_environment(rank: int, world: int, port: int) -> None:
    """The environment a trainer reads to join a gloo world of ``world`` ranks on the
    loopback interface as ``rank``, and one torch thread (two ranks share two cores)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        GLOO_SOCKET_IFNAME="lo",
    )
    torch.set_num_threads(1)
