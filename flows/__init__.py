"""tapeline orchestration: Prefect tasks, the flow and the CLI (all Prefect code lives here)."""

import os

# Stage logs (logger "tapeline.*") reach the Prefect run logs; must be set before Prefect configures logging.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "tapeline")
# Stage functions also run outside flows (`tapeline stage`, tests): no warning that they cannot log to the API.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
# A fresh PREFECT_HOME migrates its SQLite database before the ephemeral API answers: on a small or busy
# machine that takes longer than Prefect's 20 s default, and the first `make run` would fail.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
