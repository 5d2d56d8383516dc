"""`python -m pdserve.prefill_worker ...`: a prefill worker as a plain process (see pdserve.deploy.runner)."""

import sys

from pdserve.deploy.runner import main

sys.exit(main("prefill"))
