"""Great Expectations checks on the analytics marts; a failure stops the nightly run."""

from __future__ import annotations

import logging
import os

# Set before great_expectations is first imported: GX reads the variable when a
# context is created, and logs its own import at INFO.
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
logging.getLogger("great_expectations").setLevel(logging.WARNING)
