"""serve-bundle: a bundle folder (and its web player) over HTTP on 127.0.0.1 only.

Python's http.server with the MIME types the page needs (.wasm, .js/.mjs as JavaScript) and the
cross-origin isolation headers (COOP/COEP) that let LiteRT.js use its threaded wasm build
(SharedArrayBuffer). No caching, so a re-exported bundle is read afresh.
"""
from __future__ import annotations

import functools
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from ..runtime.manifest import MANIFEST
from .install import WebPlayerError
from .player import WEB_FOLDER

HOST = "127.0.0.1"


class BundleRequestHandler(SimpleHTTPRequestHandler):
    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".wasm": "application/wasm", ".js": "text/javascript", ".mjs": "text/javascript",
        ".json": "application/json", ".tflite": "application/octet-stream", ".html": "text/html; charset=utf-8",
    }
    quiet = True

    def end_headers(self):
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cache-Control", "no-store")
        super().end_headers()

    def log_message(self, format, *args):
        if not self.quiet:
            super().log_message(format, *args)


def make_server(bundle_dir: str | Path, port: int = 8765, *, quiet: bool = True) -> ThreadingHTTPServer:
    """An HTTP server for bundle_dir on 127.0.0.1:port (0: any free port); call serve_forever() on it."""
    folder = Path(bundle_dir).resolve()
    if not (folder / MANIFEST).is_file():
        raise WebPlayerError(f"{folder} is not a bundle (no {MANIFEST}); export one with `mobilediffusion export`")
    if not (folder / WEB_FOLDER / "index.html").is_file():
        raise WebPlayerError(f"{folder} has no web player; write it with `mobilediffusion web {bundle_dir}` (or "
                             "export with --web, or the web toggle of the Export TFLite Bundle node)")
    handler = functools.partial(type("Handler", (BundleRequestHandler,), {"quiet": quiet}), directory=str(folder))
    try:
        return ThreadingHTTPServer((HOST, port), handler)
    except OSError as e:
        raise WebPlayerError(f"cannot listen on {HOST}:{port} ({e.strerror}); choose another --port") from None


def player_url(server: ThreadingHTTPServer) -> str:
    return f"http://{HOST}:{server.server_address[1]}/{WEB_FOLDER}/"
