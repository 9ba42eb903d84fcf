"""CPU cost of assistant-only labelling (labkit.data.tokenize.tokenize_records), per sample.

Conversations of 1..N turns built from the shipped skills data, under each test template in
tests/templates/ (prefix-stable, reasoning-stripping, system-in-last-user, ...), tokenized with the
tiny tokenizer. One chat render per conversation whatever the template, so the cost per sample
should grow with the text, not with the number of turns squared.

    python bench/labels.py            # writes bench/results/labels.json
    python bench/labels.py --quick
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/results.py, however this file is loaded
import results as bench_results  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3000, help="conversations per measurement")
    ap.add_argument("--turns", default="1,4,8", help="assistant turns per conversation")
    ap.add_argument("--templates", default="prefix,reasoning,system_last,trim")
    ap.add_argument("--quick", action="store_true", help="300 samples, 1 and 4 turns")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "labels.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.turns = 300, "1,4"

    from transformers import AutoTokenizer

    from labkit import catalog
    from labkit.data.tokenize import tokenize_records
    from labkit.tiny import ensure_tiny

    base = catalog.load("skills")
    rows = []
    for name in args.templates.split(","):
        tok = AutoTokenizer.from_pretrained(ensure_tiny())
        tok.chat_template = (ROOT / "tests" / "templates" / f"{name}.jinja").read_text()
        for turns in map(int, args.turns.split(",")):
            recs = [{"messages": [m for k in range(turns) for m in base[(i * turns + k) % len(base)]["messages"]]}
                    for i in range(args.samples)]
            tokenize_records(recs[:20], tok, 8192)  # template compiled, analysis cached
            t0 = time.process_time()
            samples, report = tokenize_records(recs, tok, 8192)
            cpu = time.process_time() - t0
            tokens = sum(len(s.input_ids) for s in samples)
            rows.append({"template": name, "turns": turns, "samples": len(samples), "tokens": tokens,
                         "cpu_s": round(cpu, 3), "us_per_sample": round(1e6 * cpu / len(recs), 1),
                         "us_per_1k_tokens": round(1e6 * cpu / tokens * 1000, 1), "strategy": report["strategy"]})
            print(json.dumps(rows[-1]))
    print(bench_results.write(args.out, {"bench": "labels", **bench_results.machine(), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
