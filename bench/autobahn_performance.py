"""Autobahn's 9.* cases (limits and performance) against the WebSocket endpoints of a hub.

tests/reliability/test_autobahn.py runs every other case in CI; these are slow (messages up to
16 MiB, thousands of round trips). The hub runs with ``--ws-echo``: on ``/v1/echo`` they are
real round trips, judged by Autobahn's verdict. Like all echo cases, Autobahn marks them FAILED
on the push endpoints, which do not echo; there this prints the judgement
tests/reliability applies to echo cases (the hub took every frame and answered the close).
For each endpoint and case: Autobahn's verdict, the judgement, the case's running time and
the close. Messages over the hub's WebSocket limit (``max_message_bytes`` * 4/3 + 64 KiB, about
1.4 MiB by default) are expected to be refused with close code 1009; pass
``--max-message-bytes 16777216`` to let them all through.

    .venv/bin/python bench/autobahn_performance.py [--cases '9.1.*'] [--max-message-bytes N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from hubproc import HubProcess, handle_stop_signals

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.reliability.test_autobahn import ENDPOINTS, judge, run_fuzzing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", action="append", help="case pattern (default 9.*)")
    parser.add_argument("--max-message-bytes", type=int, default=None)
    parser.add_argument("--json", type=Path, help="write the verdicts here")
    args = parser.parse_args()
    handle_stop_signals()
    cases = args.cases or ["9.*"]
    extra = ["--no-tcp", "--ws-echo"]
    if args.max_message_bytes:
        extra += ["--max-message-bytes", str(args.max_message_bytes)]
    rows = []
    with HubProcess(extra) as hub, tempfile.TemporaryDirectory() as workdir:
        # One wstest process per endpoint and case group: 9.1 to 9.8 each make one group.
        groups = [[pattern] for pattern in cases]
        reports = run_fuzzing(hub.url, Path(workdir), dict.fromkeys(ENDPOINTS, groups), [])
    print("| endpoint | case | Autobahn | judged | ms | close |")
    print("|---|---|---|---|---|---|")
    failed = 0
    for agent, by_case in reports.items():
        for case in sorted(by_case, key=lambda c: [int(p) for p in c.split(".")]):
            report = by_case[case]
            why = judge(agent, case, report)
            failed += why is not None
            close = f"{report['remoteCloseCode']} {report.get('remoteCloseReason') or ''}"
            rows.append({"endpoint": agent, "case": case, "judged": why, **report})
            print(
                f"| {agent} | {case} | {report['behavior']} | {why or 'ok'} "
                f"| {report['duration']} | {close.strip()} |"
            )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
