"""Lints the dbt models with sqlfluff's dbt templater, which compiles them against a database.

`python -m rec.sqllint [sqlfluff lint args]` points dbt's profile at the pipeline's
database (the embedded server when `REC_DATABASE_URL` is unset) and lints
`dbt_project/models` with the repository's `.sqlfluff` rules.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from rec.config import REPO_ROOT


def main(argv: list[str] | None = None) -> int:
    from rec.db import database_url
    from rec.transform import set_connection_env

    set_connection_env(database_url())
    sqlfluff = Path(sys.executable).parent / "sqlfluff"
    args = argv if argv is not None else sys.argv[1:]
    command = [str(sqlfluff), "lint", "dbt_project/models", *args]
    return subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ), check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
