"""`python -m pdserve.decode_worker ...`: a decode worker as a plain process (see pdserve.deploy.runner)."""

import sys

from pdserve.deploy.runner import main

sys.exit(main("decode"))
