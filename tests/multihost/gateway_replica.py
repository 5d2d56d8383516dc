"""One more gateway process (``router.app.serve``), configured by environment so the
store URL (it carries the Redis password) stays off the command line:
``PDSERVE_TEST_GATEWAY`` = JSON of ``{"config": GatewayConfig kwargs, "host": ..., "port": ...}``.
"""

from __future__ import annotations

import json
import os

from pdserve.router.app import serve
from pdserve.router.gateway import GatewayConfig

if __name__ == "__main__":
    spec = json.loads(os.environ.pop("PDSERVE_TEST_GATEWAY"))
    serve(GatewayConfig(**spec["config"]), host=spec["host"], port=spec["port"], log_level="warning")
