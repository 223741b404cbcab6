"""`still eval MODEL [--teacher T]`: the built-in sentence-embedding evaluation of any
sentence-transformers directory (or `minilm` / `mpnet`): WordNet lemma → definition retrieval on
held-out synsets (R@1, R@10), the 12-category fortunes probe, agreement with a teacher on held-out
KJV verses, and throughput (sentences/s, warmed up, same batch size for model and teacher).

    still eval runs/my_student --teacher minilm --pairs 1000
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="a sentence-transformers model directory, or 'minilm' / 'mpnet'")
    p.add_argument("--teacher", default=None, help="a model to compare with (agreement, throughput ratio)")
    p.add_argument("--pairs", type=int, default=1000, help="held-out WordNet (lemma, definition) pairs")
    p.add_argument("--kjv", type=int, default=500, help="held-out KJV verses for agreement")
    p.add_argument("--fortunes-per-class", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--cache-dir", default=None, help="cache the embeddings (keyed by model fingerprint)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def main(args: argparse.Namespace) -> int:
    from still.integrations import sentence_transformers as sti
    from still.integrations.embedding_eval import EvalSuite, throughput

    suite = EvalSuite.build(args.pairs, args.fortunes_per_class, args.kjv)
    models: dict[str, Any] = {"model": sti.STTeacher(args.model, batch_size=args.batch_size, cache_dir=args.cache_dir)}
    if args.teacher:
        models["teacher"] = sti.STTeacher(args.teacher, batch_size=args.batch_size, cache_dir=args.cache_dir)
    out: dict[str, Any] = {}
    t_kjv = suite.encode_kjv(models["teacher"].encode) if args.teacher else None
    for name, m in models.items():
        out[name] = suite.evaluate(m.encode, t_kjv if name == "model" else None)
    tp = throughput({k: (lambda t, m=m: sti.st_encode(m.model, t, args.batch_size)) for k, m in models.items()},
                    suite.definitions[:256])
    for k, v in tp.items():
        out[k]["sent_per_s"] = v
    if args.json:
        print(json.dumps(out))
        return 0
    for name, m in out.items():
        print(f"{name}: " + ", ".join(f"{k}={v:.4f}" for k, v in m.items() if isinstance(v, float)))
    return 0


__all__ = ["add_arguments", "main"]
