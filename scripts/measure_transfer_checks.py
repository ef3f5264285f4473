"""What checking the sessions a transfer reads costs a message: the checks
`migrate_storage` and `export_to_json` run (persistence.transfer.stored_values) beside
the models' full validation, which a restore of a SQLite backup runs (backup_rows).

Builds `--sessions` sessions of `--messages` messages of `--size` characters in memory
(no store), times each way over all of them `--repeats` times, and prints the best
time a message of each as JSON.

    python scripts/measure_transfer_checks.py
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import Texts

from persistence import ChatSession
from persistence.transfer.exchange_format import session_document, session_from_document
from persistence.transfer.stored_values import check_session


def _best_per_message(
    check: Callable[[list[ChatSession]], object], sessions: list[ChatSession], repeats: int
) -> float:
    messages = sum(len(session.messages) for session in sessions)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        check(sessions)
        best = min(best, time.perf_counter() - started)
    return round(best / messages * 1e6, 3)


def _checks(sessions: list[ChatSession]) -> None:
    for session in sessions:
        check_session(session)


def _full_validation(sessions: list[ChatSession]) -> None:
    for index, session in enumerate(sessions):
        session_from_document(session_document(session), index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=400)
    parser.add_argument("--messages", type=int, default=25)
    parser.add_argument("--size", type=int, default=300, help="characters a message")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    texts = Texts(args.size)
    sessions = []
    for index in range(args.sessions):
        session = ChatSession.create("bench-model", metadata={"user": "u1", "n": index})
        for role, content in texts.many(args.messages):
            session.add_message(role, content)
        sessions.append(session)
    print(
        json.dumps(
            {
                "messages": args.sessions * args.messages,
                "transfer_checks_us_per_message": _best_per_message(
                    _checks, sessions, args.repeats
                ),
                "full_validation_us_per_message": _best_per_message(
                    _full_validation, sessions, args.repeats
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
