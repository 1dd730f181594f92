"""One worker of a locally launched training cluster: `python -m stages.train.worker CONFIG_JSON ARTIFACTS`.

The local launcher (`tapeline.cluster.launch_local_workers`) runs this in every worker process with its own
TF_CONFIG; it trains the config's train stage like `tapeline stage train` does on a cluster.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from tapeline.config import read_config_file, validate_config
from tapeline.errors import TapelineError


def main(argv: list[str]) -> int:
    """Train as one worker; exit status 2 with one error line on a TapelineError."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for noisy in ("httpx", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    config_file, artifacts = Path(argv[0]), argv[1]
    try:
        from stages.graph import run_stage

        run_stage("train", validate_config(read_config_file(config_file)), artifacts)
    except TapelineError as exc:
        print(f"tapeline: error: {exc}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
