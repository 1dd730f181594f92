"""tapeline orchestration: Prefect tasks, the flow and the CLI (all Prefect code lives here)."""

import os

# Stage logs (logger "tapeline.*") reach the Prefect run logs; must be set before Prefect configures logging.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tapeline")
