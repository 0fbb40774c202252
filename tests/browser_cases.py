"""Node.js, headless Chromium and playwright-core for the tests that drive a page (the web player's, ComfyUI's
graph editor): skip markers that say what to install, and playwright-core from tests/web's lockfile."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

DRIVER_DIR = Path(__file__).resolve().parent / "web"
CHROMIUM = os.environ.get("MD_CHROMIUM", "/usr/bin/chromium")


def _node_major() -> int:
    if not (shutil.which("node") and shutil.which("npm")):
        return 0
    out = subprocess.run(["node", "--version"], capture_output=True, text=True).stdout  # v20.11.0
    match = re.match(r"v(\d+)", out.strip())
    return int(match.group(1)) if match else 0


NODE_MAJOR = _node_major()
needs_node = pytest.mark.skipif(NODE_MAJOR < 20, reason="Node.js >= 20 with npm is not installed (playwright-core "
                                                        "needs 20; nodejs.org or the distribution's nodejs + npm)")
needs_chromium = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                    reason=f"Chromium is not installed at {CHROMIUM} (apt-get install chromium, or set "
                                           "MD_CHROMIUM)")


def playwright_core() -> Path:
    """The playwright-core package folder (npm ci from tests/web's lockfile, kept in ~/.cache/mobilediffusion)."""
    from mobilediffusion.web.install import npm_ci

    return npm_ci(DRIVER_DIR, "web-test") / "node_modules" / "playwright-core"
