"""The bundle's web player: a static page that runs a bundle with LiteRT.js in the browser.

    from mobilediffusion.web import write_player
    write_player("output/mobilediffusion/my-bundle")   # -> my-bundle/web/, then:
    # mobilediffusion serve-bundle output/mobilediffusion/my-bundle  (http://127.0.0.1:8765/web/)

The page's sources are in player/; the npm packages it runs on (LiteRT.js, @huggingface/tokenizers) are
installed from player/package-lock.json with `npm ci` into a cache folder and copied next to the page,
so the page fetches nothing from outside the bundle folder.
"""
from .install import WebPlayerError
from .player import PLAYER_DIR, check_web_precision, prepare_player, write_player

__all__ = ["PLAYER_DIR", "WebPlayerError", "check_web_precision", "prepare_player", "write_player"]
