"""Triage evaluation: precision and recall per tier on fixtures/triage/eval.jsonl and each
later blind set (``fixtures/triage/holdout*.jsonl``).

Prints each split (``dev``, ``holdout``, ``holdout2``, ``holdout3``, ...) and their union; see
fixtures/triage/EVAL-NOTES.md for how each split was written and used, and which scores
were blind. Targets (issue 9): recall 1.0 on the emergency tier, overall precision at
least 0.8 (micro-averaged over the three tiers: a message counts as a true positive when
its predicted tier equals its labelled tier). Also prints intent accuracy and throughput.
``--show-errors SPLIT`` lists that split's mistakes (use it on ``dev`` while writing rules).
Exit status is 0: a benchmark reports, it does not gate.
"""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

# bench/ holds scripts named like packages (bench/orchestrator.py): the repository root
# must come first on the path, or ``orchestrator`` would resolve to that script.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.triage import TIERS, assess, load_lexicon

DATA = Path(__file__).resolve().parent.parent / "fixtures" / "triage"
EVAL = [DATA / "eval.jsonl", *sorted(DATA.glob("holdout*.jsonl"))]
NOW = datetime(2026, 3, 1, 12, tzinfo=UTC)


def _pr(rows: list[tuple[dict[str, object], str | None, str]]) -> dict[str, tuple[float, float, int]]:
    out: dict[str, tuple[float, float, int]] = {}
    tp_all = pred_all = 0
    for tier in TIERS:
        tp = sum(1 for r, p, _ in rows if p == tier and r["tier"] == tier)
        pred = sum(1 for _, p, _ in rows if p == tier)
        gold = sum(1 for r, _, _ in rows if r["tier"] == tier)
        out[tier] = (tp / pred if pred else 1.0, tp / gold if gold else 1.0, gold)
        tp_all, pred_all = tp_all + tp, pred_all + pred
    out["overall"] = (tp_all / pred_all if pred_all else 1.0, float("nan"), len(rows))
    return out


def main() -> None:
    lex = load_lexicon()
    data = [
        json.loads(line) for f in EVAL for line in f.read_text(encoding="utf-8").splitlines() if line.strip()
    ]
    t0 = time.perf_counter()
    results = []
    for r in data:
        a = assess(r["text"], keyword=r.get("keyword"), now=NOW, lex=lex)
        results.append((r, a.tier, a.intent))
    elapsed = time.perf_counter() - t0
    print(
        f"triage eval: {len(data)} messages (lexicon {lex.version}), "
        f"{len(data) / elapsed:.0f} msg/s, {elapsed / len(data) * 1e3:.2f} ms/msg"
    )
    splits = list(dict.fromkeys(str(r["split"]) for r in data))
    for split in [*splits, "all"]:
        rows = [x for x in results if split == "all" or x[0]["split"] == split]
        pr = _pr(rows)
        intent_ok = sum(1 for r, _, i in rows if i == r["intent"]) / len(rows)
        print(f"-- {split}: n={len(rows)}  intent accuracy {intent_ok:.3f}")
        for tier in TIERS:
            p, rc, n = pr[tier]
            print(f"   {tier:<9} precision {p:.3f}  recall {rc:.3f}  (n={n})")
        p_all = pr["overall"][0]
        em_recall = pr["emergency"][1]
        print(
            f"   overall   precision {p_all:.3f}   targets: emergency recall 1.0 "
            f"[{'met' if em_recall == 1.0 else 'NOT met'}], overall precision >= 0.8 "
            f"[{'met' if p_all >= 0.8 else 'NOT met'}]"
        )
    if len(sys.argv) > 2 and sys.argv[1] == "--show-errors":
        for r, got_tier, got_intent in results:
            if r["split"] == sys.argv[2] and (got_tier != r["tier"] or got_intent != r["intent"]):
                print(
                    f"   {r['id']}: want {r['tier']}/{r['intent']} got {got_tier}/{got_intent}: {r['text']}"
                )


if __name__ == "__main__":
    main()
