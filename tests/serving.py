"""A ChatServer on a free loopback port in a background thread, for the server tests."""
import threading
from contextlib import contextmanager

from flashlite.server.app import ChatServer


@contextmanager
def serving(model, **kwargs):
    """Yields the running server; shuts it down and joins its thread on exit."""
    server = ChatServer(model, port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
