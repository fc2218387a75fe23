"""Debian's Chromium for the browser tests, installed when missing (the suite runs as root in CI),
driven by Playwright with executable_path (no browser download)."""
from __future__ import annotations

import io
import shutil
import subprocess

from PIL import Image


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], check=True, capture_output=True, timeout=900)
    found = shutil.which("chromium")
    if not found:
        raise RuntimeError("Debian's chromium package installed no chromium binary")
    return found


def non_blank(png: bytes) -> bool:
    """A screenshot with real content: many colours, not one flat fill."""
    image = Image.open(io.BytesIO(png)).convert("RGB").resize((160, 120))
    colours = image.getcolors(maxcolors=160 * 120) or []
    biggest = max(count for count, _ in colours) if colours else 160 * 120
    return len(colours) >= 16 and biggest < 0.95 * 160 * 120
