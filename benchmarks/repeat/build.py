"""Writes ``repeat/questions.jsonl``: 20 Spec-Bench questions (the first turn of the first two of
each of ten categories) asked twice in one session, for ``freespec bench --questions``.

The first asking is category ``ask 1``, the second ``ask 2``, so the report's rows show what a
drafter that keeps earlier requests (``suffix``'s store, ``trie``) gains the second time.

    python benchmarks/repeat/build.py
    freespec bench --questions benchmarks/repeat/questions.jsonl --methods none,suffix,... --baseline none
"""

from __future__ import annotations

import json
from pathlib import Path

from freespec.bench.run import DEFAULT_QUESTIONS, load_questions

CATEGORIES = 10
PER_CATEGORY = 2


def main() -> None:
    questions = load_questions(DEFAULT_QUESTIONS, per_category=PER_CATEGORY)
    categories = list(dict.fromkeys(q.category for q in questions))[:CATEGORIES]
    chosen = [q for q in questions if q.category in categories]
    lines = [json.dumps({"question_id": f"{ask}-{q.question_id}", "category": f"ask {ask}", "turns": [q.turns[0]]},
                        ensure_ascii=False) for ask in (1, 2) for q in chosen]
    out = Path(__file__).resolve().parent / "questions.jsonl"
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{len(lines)} questions → {out}")


if __name__ == "__main__":
    main()
