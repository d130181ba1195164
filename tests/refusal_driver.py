"""Run several `recap` commands (recap_app.cli.main) one after another in ONE process, each to its exit.

    python tests/refusal_driver.py JOBS_JSON

For tests of many commands that should fail early (torchrec's import, ~5 s, is paid once). After each job
it prints ``=== refusal job I exit CODE MESSAGE_JSON`` to stderr: CODE is the exit status the `recap`
console script would have had (1 for a `recap: error: ...` exit), MESSAGE_JSON the text it would print.
"""

from __future__ import annotations

import json
import sys

from recap_app import cli

MARKER = "=== refusal job"


def main(jobs: list[list[str]]) -> int:
    for i, argv in enumerate(jobs):
        try:
            code, message = cli.main(argv), ""
        except SystemExit as e:  # exit_on_input_error: SystemExit("recap: error: ...")
            code, message = (1, e.code) if isinstance(e.code, str) else (e.code, "")
        print(f"{MARKER} {i} exit {code} {json.dumps(message)}", file=sys.stderr, flush=True)
    return 0


def parse(output: str) -> dict[int, tuple[int, str]]:
    """{job: (exit code, message)} from a driver's output."""
    out = {}
    for line in output.splitlines():
        if line.startswith(MARKER):
            job, _, code, message = line[len(MARKER) + 1 :].split(" ", 3)
            out[int(job)] = (int(code), json.loads(message))
    return out


if __name__ == "__main__":
    raise SystemExit(main(json.loads(sys.argv[1])))
