"""CLI commands `web` and `serve-bundle`; `add_parser(subparsers)` registers both on the main parser.

    mobilediffusion web DIR                 write the web player into DIR/web (needs node + npm once)
    mobilediffusion serve-bundle DIR        serve DIR on http://127.0.0.1:8765/web/
"""
from __future__ import annotations


def cmd_web(a) -> int:
    from .player import write_player

    path = write_player(a.bundle)
    print(f"wrote {path}; open it with: mobilediffusion serve-bundle {a.bundle}")
    return 0


def cmd_serve_bundle(a) -> int:
    from .serve import make_server, player_url

    server = make_server(a.bundle, a.port, quiet=not a.verbose)
    print(f"serving {a.bundle} at {player_url(server)} (127.0.0.1 only; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def add_parser(subparsers) -> None:
    """Register `web` and `serve-bundle` on the CLI's subparsers."""
    w = subparsers.add_parser("web", help="write the web player (LiteRT.js) into a bundle folder")
    w.add_argument("bundle", help="bundle folder")
    w.set_defaults(func=cmd_web)

    s = subparsers.add_parser("serve-bundle", help="serve a bundle folder and its web player on 127.0.0.1")
    s.add_argument("bundle", help="bundle folder (with a web player: `mobilediffusion web DIR`)")
    s.add_argument("--port", type=int, default=8765, help="port on 127.0.0.1 (0: any free port; default 8765)")
    s.set_defaults(func=cmd_serve_bundle)
