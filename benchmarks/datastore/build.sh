#!/usr/bin/env bash
# A retrieval datastore (REST) for the benchmark: the model's own answers to held-out Spec-Bench
# questions (6-8 of each category, first turns, which the 5-per-category benchmark never asks) as
# the chat corpus, plus the Python standard library's top-level sources as the code corpus.
# Usage: bash benchmarks/datastore/build.sh OUT_DIR   (then: freespec bench --datastore OUT_DIR/store)
set -euo pipefail
out=${1:?usage: build.sh OUT_DIR}
here=$(cd "$(dirname "$0")" && pwd)
questions=${QUESTIONS:-$here/../../../shared/data/spec_bench/question.jsonl}
mkdir -p "$out"
python3 - "$questions" "$out/heldout.jsonl" <<'PY'
import json, sys
from collections import defaultdict
seen, lines = defaultdict(int), []
for line in open(sys.argv[1], encoding="utf-8"):
    question = json.loads(line)
    seen[question["category"]] += 1
    if 6 <= seen[question["category"]] <= 8:
        lines.append(json.dumps({"prompt": question["turns"][0], "question_id": question["question_id"]}))
open(sys.argv[2], "w", encoding="utf-8").write("\n".join(lines) + "\n")
print(f"{len(lines)} held-out questions", file=sys.stderr)
PY
python3 -m freespec generate --input "$out/heldout.jsonl" --output "$out/answers.jsonl" --drafter lookup --max-new-tokens 256
python3 - "$out/answers.jsonl" "$out/corpus.jsonl" <<'PY'
import glob, json, sys, sysconfig
with open(sys.argv[2], "w", encoding="utf-8") as corpus:
    for line in open(sys.argv[1], encoding="utf-8"):
        corpus.write(json.dumps({"text": json.loads(line)["text"]}) + "\n")
    for path in sorted(glob.glob(sysconfig.get_paths()["stdlib"] + "/*.py")):
        corpus.write(json.dumps({"text": open(path, encoding="utf-8", errors="replace").read()}) + "\n")
PY
python3 -m freespec datastore build "$out/corpus.jsonl" -o "$out/store"
