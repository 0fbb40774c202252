"""npm packages from a lockfile, installed once per lockfile with `npm ci` into a cache folder.

    <cache>/<name>-<hash of package.json + package-lock.json>/node_modules/...

<cache> is $MOBILEDIFFUSION_CACHE, else $XDG_CACHE_HOME/mobilediffusion, else ~/.cache/mobilediffusion.
An install runs in a temporary folder renamed into place when npm succeeded, so a failed or
interrupted one leaves nothing that looks installed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ..atomic import fresh_dir
from ..errors import MobileDiffusionError

NODE_INSTALL = ("install Node.js (18 or newer) with npm: on Debian/Ubuntu `apt-get install nodejs npm`, "
                "elsewhere from nodejs.org")
NPM_TIMEOUT = 900  # seconds for one `npm ci`


class WebPlayerError(MobileDiffusionError):
    """The web player cannot be written or served (no npm, a failed install, no bundle)."""


def require_npm() -> str:
    """The npm executable; WebPlayerError naming what to install when node or npm is missing."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        missing = " and ".join(n for n, p in (("node", node), ("npm", npm)) if p is None)
        raise WebPlayerError(f"the web player needs Node.js and npm to install LiteRT.js and the tokenizer from its "
                             f"lockfile, and {missing} was not found on PATH; {NODE_INSTALL}")
    return npm


def cache_root() -> Path:
    if os.environ.get("MOBILEDIFFUSION_CACHE"):
        return Path(os.environ["MOBILEDIFFUSION_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mobilediffusion"


def lock_hash(package_dir: Path) -> str:
    """sha256 of package.json and package-lock.json (what `npm ci` installs), hex."""
    h = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        path = package_dir / name
        if not path.is_file():
            raise WebPlayerError(f"{path} is missing; reinstall mobilediffusion")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def npm_ci(package_dir: str | Path, name: str) -> Path:
    """The folder holding node_modules/ for package_dir's lockfile (installed on first use); WebPlayerError
    when npm is missing or the install fails."""
    package_dir = Path(package_dir)
    key = lock_hash(package_dir)[:16]
    root = cache_root()
    dest = root / f"{name}-{key}"
    if (dest / "node_modules" / ".package-lock.json").is_file():
        return dest
    npm = require_npm()
    root.mkdir(parents=True, exist_ok=True)
    tmp = fresh_dir(root, f".{name}-{key}.partial-")
    try:
        for file in ("package.json", "package-lock.json"):
            shutil.copyfile(package_dir / file, tmp / file)
        try:
            r = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"],
                               cwd=tmp, capture_output=True, text=True, timeout=NPM_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise WebPlayerError(f"`npm ci` for {package_dir} did not finish in {NPM_TIMEOUT} s; check that the npm "
                                 "registry is reachable and try again") from None
        if r.returncode != 0:
            tail = (r.stderr or r.stdout).strip()[-1500:]
            raise WebPlayerError(f"`npm ci` for {package_dir} failed (exit {r.returncode}): {tail}\nCheck that the "
                                 "npm registry is reachable (npm config get registry) and try again")
        if dest.exists():  # installed meanwhile by another process: keep that one
            return dest
        os.replace(tmp, dest)
        return dest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
