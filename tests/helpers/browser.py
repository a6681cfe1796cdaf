"""Headless Chromium (Debian's package) for tests that look at a page as a user's browser shows it.

    ensure_chromium()                       # installs the package with apt-get if it is missing (root)
    dom = render(url, screenshot=path)      # the page's DOM after its scripts ran, and a PNG of it

Every call uses a fresh profile (an empty localStorage, as a first visit), so what the page shows does not
depend on an earlier visit.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

BINARIES = ("chromium", "chromium-browser")
APT_PACKAGES = ["chromium"]


class BrowserUnavailable(RuntimeError):
    """No Chromium and no way to install it here (not root, or no apt-get)."""


def chromium() -> str | None:
    return next((path for name in BINARIES if (path := shutil.which(name))), None)


def ensure_chromium(timeout_s: float = 900) -> str:
    """The Chromium binary, installing Debian's package first if it is missing (``apt-get update`` when the
    install fails on stale package lists)."""
    found = chromium()
    if found:
        return found
    if os.name != "posix" or os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise BrowserUnavailable("chromium is not installed, and installing it needs root and apt-get "
                                 "(apt-get install chromium)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]
    proc = subprocess.run(install, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode:
        for cmd in (["apt-get", "update", "-qq"], install):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
            if proc.returncode:
                raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{proc.stderr[-2000:]}")
    found = chromium()
    if not found:
        raise RuntimeError(f"installed {APT_PACKAGES} but none of {BINARIES} is on PATH")
    return found


def _run(args: list[str], url: str, wait_ms: int, timeout_s: float) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [ensure_chromium(), "--headless", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               f"--user-data-dir={profile}", "--window-size=1400,1000", f"--virtual-time-budget={wait_ms}", *args, url]
        if os.name == "posix" and os.geteuid() == 0:
            cmd.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=profile)


def render(url: str, *, screenshot: Path | None = None, wait_ms: int = 20_000, timeout_s: float = 180) -> str:
    """The DOM of ``url`` once its scripts have run (``wait_ms`` of the page's virtual time: its requests to
    the server included), and, given ``screenshot``, a PNG of the page saved there."""
    proc = _run(["--dump-dom"], url, wait_ms, timeout_s)
    if proc.returncode or not proc.stdout:
        raise RuntimeError(f"chromium --dump-dom {url} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        shot = _run([f"--screenshot={screenshot.resolve()}"], url, wait_ms, timeout_s)
        if shot.returncode or not screenshot.is_file():
            raise RuntimeError(f"chromium --screenshot {url} failed ({shot.returncode}):\n{shot.stderr[-2000:]}")
    return proc.stdout
