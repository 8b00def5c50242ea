"""A TCP port on loopback for the tests' own torchrun / process groups / Ray heads."""
import socket


def free_port() -> int:
    """A port that was free a moment ago (the OS picks it; the caller binds it right away)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
