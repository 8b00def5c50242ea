"""A TCP proxy on 127.0.0.1 that a test can cut and restore: an outage of the server behind it, as clients
see one (connections refused, open ones reset), without touching the server.

    with TcpProxy("127.0.0.1", server_port) as proxy:
        url = f"http://127.0.0.1:{proxy.port}"
        proxy.cut()       # open connections are reset, new ones refused
        proxy.restore()   # accepts again, on the same port
        proxy.cut_on(b"shard.", seconds=5)  # the outage starts with the first request that holds the bytes
"""
from __future__ import annotations

import socket
import threading
from typing import List, Optional


class TcpProxy:
    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = 0
        self._listener: Optional[socket.socket] = None
        self._conns: List[socket.socket] = []
        self._lock = threading.Lock()
        self.connections = 0  # accepted so far (a test can tell traffic went through)
        self.outages = 0      # outages cut_on started
        self._trigger: Optional[bytes] = None
        self._outage_s = 0.0

    # ------------------------------------------------------------------ control
    def __enter__(self) -> "TcpProxy":
        self.restore()
        return self

    def __exit__(self, *exc) -> None:
        self.cut()

    def restore(self) -> None:
        """Listen (again) on the proxy's port: the first call picks a free one."""
        with self._lock:
            if self._listener is not None:
                return
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", self.port))
            s.listen(64)
            self.port = s.getsockname()[1]
            self._listener = s
        threading.Thread(target=self._accept, args=(s,), daemon=True).start()

    def cut(self) -> None:
        """Stop listening and reset every open connection."""
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            listener.close()
        for c in conns:
            _close(c)

    def cut_on(self, pattern: bytes, seconds: float = float("inf")) -> None:
        """Cut at the first client request holding ``pattern`` (that request fails too); restore after
        ``seconds`` (inf: stay cut). Once: the next outage needs another call."""
        self._trigger, self._outage_s = pattern, seconds

    def _outage(self) -> None:
        self._trigger = None
        self.outages += 1
        self.cut()
        if self._outage_s != float("inf"):
            timer = threading.Timer(self._outage_s, self.restore)
            timer.daemon = True
            timer.start()

    # ------------------------------------------------------------------ relaying
    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:  # closed by cut()
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                _close(client)
                continue
            with self._lock:
                if self._listener is not listener:
                    _close(client)
                    _close(upstream)
                    return
                self._conns += [client, upstream]
                self.connections += 1
            threading.Thread(target=_pipe, args=(client, upstream, self), daemon=True).start()
            threading.Thread(target=_pipe, args=(upstream, client, None), daemon=True).start()


def _pipe(src: socket.socket, dst: socket.socket, proxy: Optional[TcpProxy]) -> None:
    try:
        while True:
            data = src.recv(1 << 16)
            if not data:
                break
            trigger = proxy._trigger if proxy is not None else None
            if trigger is not None and trigger in data:
                proxy._outage()
                break
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # reset, not FIN
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass
