"""Entry point: python -m comfy_multigpu.balancer [--backend URL[=weight]]... (see settings.py)."""
from __future__ import annotations

import logging
import sys

from aiohttp import web

from .app import make_app
from .dispatch import Balancer
from .settings import SettingsError, resolve


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = resolve(argv)
    except SettingsError as ex:
        print(f"comfy-multigpu balancer: {ex}", file=sys.stderr)
        return 2
    balancer = Balancer(settings)
    web.run_app(make_app(balancer), host=settings.host, port=settings.port, print=None,
                access_log=None, shutdown_timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
