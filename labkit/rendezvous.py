"""`accelerate launch` with torchelastic's rendezvous store listening on one address only.

torchrun's agent serves its TCPStore on every interface, whatever `--master_addr` says (c10d binds
the server socket to `::`/0.0.0.0): a 2-process run on a laptop or a shared node accepts
connections from the network. c10d can instead serve on a socket it is handed
(`master_listen_fd`), so this module binds that socket to $LABKIT_RDZV_HOST (127.0.0.1 for runs on
one machine: see labkit.launch._child_env) and passes it to every server-side store the launcher
creates, then runs accelerate's launcher in the same process. Workers only connect as clients.

    python -m labkit.rendezvous [accelerate launch arguments]

Without $LABKIT_RDZV_HOST it is plain `accelerate launch`.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

HOST_ENV = "LABKIT_RDZV_HOST"
_ARGS = ("host_name", "port", "world_size", "is_master", "timeout", "wait_for_workers", "multi_tenant",
         "master_listen_fd", "use_libuv")


def bind_store_to(host: str) -> None:
    """Make every server-side `torch.distributed.TCPStore` created from now on listen on `host` only."""
    import torch.distributed as dist

    base = dist.TCPStore
    if getattr(base, "_labkit_host", None):
        return

    class BoundTCPStore(base):  # type: ignore[misc, valid-type]
        _labkit_host = host

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(zip(_ARGS, args))
            if kwargs.get("is_master") and kwargs.get("master_listen_fd") is None:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((host, int(kwargs.get("port") or 0)))
                sock.listen(1024)
                kwargs["master_listen_fd"] = sock.fileno()
                kwargs["port"] = sock.getsockname()[1]
            else:
                sock = None
            super().__init__(**kwargs)
            self._labkit_socket = sock  # c10d serves on it: it must live as long as the store

    dist.TCPStore = BoundTCPStore


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    host = os.environ.get(HOST_ENV)
    if host:
        bind_store_to(host)
    from accelerate.commands.launch import main as accelerate_main

    sys.argv = ["accelerate-launch", *argv]
    accelerate_main()


if __name__ == "__main__":
    main()
