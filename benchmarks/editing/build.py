"""Build the editing workload: public-domain passages with injected typos, to be corrected.

Each passage in ``passages.txt`` gets typos in about one word in eight (a swapped, dropped,
doubled or replaced letter), chosen by a seeded RNG, so the file is the same on every machine.
The answer is mostly a copy of the prompt: the workload where input copy (``lookup``) pays.

    python benchmarks/editing/build.py            # writes benchmarks/editing/questions.jsonl
    freespec bench --questions benchmarks/editing/questions.jsonl --methods none,lookup,recycling
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).parent
INSTRUCTION = "Correct the spelling mistakes in the following text. Reply with the corrected text only.\n\n"
TYPO_RATE = 0.125
SEED = 0


def passages(path: Path) -> list[tuple[str, str]]:
    """(source, text) for each paragraph of ``path``; a ``#`` line names the next paragraph's source."""
    found, source = [], None
    for block in path.read_text(encoding="utf-8").split("\n\n"):
        lines = [line for line in block.strip().splitlines() if line.strip()]
        comments = [line[1:].strip() for line in lines if line.startswith("#")]
        text = " ".join(line.strip() for line in lines if not line.startswith("#"))
        source = comments[-1] if comments else source
        if text:
            found.append((source, text))
    return found


def misspell(word: str, rng: random.Random) -> str:
    """One typo inside ``word`` (its first letter is kept, as most real typos do)."""
    i = rng.randrange(1, len(word) - 1)
    kind = rng.choice(("swap", "drop", "double", "replace"))
    if kind == "swap":
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if kind == "drop":
        return word[:i] + word[i + 1 :]
    if kind == "double":
        return word[:i] + word[i] + word[i:]
    return word[:i] + rng.choice("aeioustnrl".replace(word[i].lower(), "")) + word[i + 1 :]


def inject_typos(text: str, rng: random.Random, rate: float = TYPO_RATE) -> str:
    """``text`` with about ``rate`` of its words of 4+ letters misspelled; never returns it unchanged.

    >>> inject_typos("the quick brown foxes jumped", random.Random(1), rate=1.0) != "the quick brown foxes jumped"
    True
    """
    words = re.split(r"(\W+)", text)
    candidates = [i for i, word in enumerate(words) if word.isalpha() and len(word) >= 4]
    chosen = [i for i in candidates if rng.random() < rate] or [rng.choice(candidates)]
    for i in chosen:
        words[i] = misspell(words[i], rng)
    return "".join(words)


def main() -> None:
    rng = random.Random(SEED)
    lines = []
    for number, (source, text) in enumerate(passages(HERE / "passages.txt"), 1):
        question = {"question_id": f"editing-{number}", "category": "editing",
                    "turns": [INSTRUCTION + inject_typos(text, rng)], "source": source, "reference": text}
        lines.append(json.dumps(question, ensure_ascii=False))
    (HERE / "questions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} questions to {HERE / 'questions.jsonl'}")


if __name__ == "__main__":
    main()
