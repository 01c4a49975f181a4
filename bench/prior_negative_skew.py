"""Diagnostic for docs/trainer.md ("Recipes tried"): does the skew of HSCR's negatives toward the history's kind cost
the in-prior accuracy? The same dataset with the skew removed: on counter-prior items, a random share of the levels
that name the kind the history implies name the third kind instead (the other wrong one), so that a third of the
levels naming a wrong kind name the history's, as negatives independent of the history would. It uses the items'
ground truth (which words carry the prior), so it is a diagnostic, not a recipe.

python bench/prior_negative_skew.py --workdir /tmp/pilot --dataset hscr+own-rejected \
    --method "own-rejected explicit+rpo" --seeds 1 2

``--workdir`` is an ``hscr reproduce prior`` workdir whose ``sft`` and ``--method`` runs for these seeds are done.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from hscr_trainer.reproduce import train_one
from hscr_trainer.reproduce_prior import METHODS, negative_prior_share, paired_bootstrap, split_scores


def unskewed_rows(rows: list[dict], truth: dict[str, dict], seed: int) -> list[dict]:
    from hscr_worker.fixture import prior

    def implied_and_third(item):
        values = prior.PRIORS[prior.HISTORY_ATTRIBUTE[item["history"]]]["values"]
        implied = prior.implied(item["history"])
        return implied, next(v for v in values if v not in (implied, prior.value(item)))

    share = negative_prior_share(rows, truth)
    wrong, named = share["levels_naming_a_wrong_value"], share["share_naming_the_history_value"]
    # A swap moves a level from named to the others; keep wrong / 3 of the n_named levels.
    n_named = round(wrong * named)
    keep = wrong / 3 / n_named if n_named else 1.0
    rng = random.Random(seed)
    out = []
    for row in rows:
        item = truth[row["custom_id"]]
        if prior.value(item) == prior.implied(item["history"]):
            out.append(row)
            continue
        implied, third = implied_and_third(item)
        levels, texts = [], {level["text"] for level in row["levels"]}
        for level in row["levels"]:
            words = level["text"].split()
            if implied in words and rng.random() > keep:
                swapped = " ".join(third if w == implied else w for w in words)
                if swapped not in texts:  # never two equal levels
                    texts = (texts - {level["text"]}) | {swapped}
                    level = {**level, "text": swapped, "replacements": [
                        {**r, "replacement": third if r["replacement"] == implied else r["replacement"]}
                        for r in level["replacements"]]}
            levels.append(level)
        out.append({**row, "levels": levels})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--dataset", default="hscr+own-rejected")
    parser.add_argument("--method", default="own-rejected explicit+rpo")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    from hscr_client import schema
    from hscr_client.storage import open_location
    from hscr_worker.dataset import parquet_bytes, read_rows

    results_all = json.loads((args.workdir / "results.json").read_text())
    settings, runs = results_all["settings"], results_all["runs"]
    with open(args.workdir / "items" / "items.jsonl", encoding="utf-8") as f:
        truth = {row["custom_id"]: row["attributes"] for row in map(json.loads, f)}
    source = args.workdir / args.dataset
    out = args.workdir / f"{args.dataset}-unskewed"
    if not (out / "manifest.json").exists():
        rows = unskewed_rows(read_rows(str(source), schema.RANKED), truth, settings["data_seed"])
        location = open_location(str(out))
        location.write_bytes("ranked/part-00000.parquet", parquet_bytes(rows, schema.RANKED))
        pairs = [p for row in rows for p in schema.pair_rows(row)]
        location.write_bytes("pairs/part-00000.parquet", parquet_bytes(pairs, schema.PAIRS))
        location.write_bytes("manifest.json", json.dumps({"configs": {"ranked": {"rows": len(rows)}},
                                                          "source": str(source)}).encode())
    before = negative_prior_share(read_rows(str(source), schema.RANKED), truth)
    after = negative_prior_share(read_rows(str(out), schema.RANKED), truth)
    print(f"levels naming a wrong kind that name the history's: {before} -> {after}")
    dataset, loss_type, extra = METHODS[args.method]
    if dataset != args.dataset:
        raise SystemExit(f"{args.method} trains on {dataset}, not {args.dataset}")
    hyper = {key: settings[key] for key in ("num_train_epochs", "per_device_train_batch_size", "learning_rate",
                                            "gamma", "lr_scheduler_type", "warmup_steps", "nll_weight")}
    name = f"{args.method} unskewed"
    results_path = args.workdir / "unskewed.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for seed in args.seeds:
        if str(seed) in results:
            continue
        started = time.time()
        final = train_one(out, loss_type, seed, args.workdir / "runs" / f"{name}-{seed}", {**hyper, **extra},
                          args.workdir / f"ref-logps-{args.dataset}-unskewed.json", settings["model"])
        results[str(seed)] = {**split_scores(str(final), seed, 300), "seconds": round(time.time() - started, 1)}
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    for label, arm in ((name, results), (args.method, runs[args.method]), ("sft", runs["sft"])):
        cells = [label]
        for split in ("counter-prior", "in-prior"):
            exact = sum(arm[str(s)][split]["exact"] for s in args.seeds) / len(args.seeds)
            cells.append(f"{split} {100 * exact:.1f}")
            if arm is not results:
                point, low, high = paired_bootstrap({str(s): results[str(s)][split]["correct"] for s in args.seeds},
                                                    {str(s): arm[str(s)][split]["correct"] for s in args.seeds})
                cells.append(f"unskewed - this {100 * point:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]")
        print(" | ".join(cells))


if __name__ == "__main__":
    main()
