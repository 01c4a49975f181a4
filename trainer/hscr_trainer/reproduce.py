"""Rebuild the reproduction table on the fixture: base vs DPO on random negatives vs HSCR's losses.

``python bench/reproduce.py`` (or ``python -m hscr_trainer.reproduce``) runs, in ``--workdir``:

1. held-out training items from ``--data-seed`` (never the fixture's training seed, never an eval seed);
2. ``hscr generate`` with the shipped defaults -> the HSCR dataset (``ranked`` + ``pairs``);
3. a control dataset with the same items and the same number of levels per item, whose level m
   replaces m random words of the same answer with random vocabulary words (random-token negatives);
4. for each seed: train ``dpo-random`` (explicit loss on the control), ``explicit``, ``implicit`` and
   ``explicit+implicit`` on the HSCR data, all with identical hyper-parameters;
5. evaluates base and every trained model on held-out items from that seed's eval seed, and writes
   ``results.json`` and ``table.md`` (mean +- sample std over seeds; paired difference to base).

Finished steps are reused when the command is run again (delete the workdir to start over).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

from hscr_worker.fixture import resolve_model, synthetic
from hscr_worker.fixture.train import TRAIN_SEED

EVAL_SEED_BASE = 7000  # eval items for seed s come from EVAL_SEED_BASE + s
METHODS = {  # name -> (dataset, loss_type)
    "dpo-random": ("random", "explicit"),
    "explicit": ("hscr", "explicit"),
    "implicit": ("hscr", "implicit"),
    "explicit+implicit": ("hscr", "explicit,implicit"),
}
METRICS = ("exact", "hallucination", "malformed")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def build_hscr_dataset(workdir: Path, n_items: int, data_seed: int, model: str = "fixture", *,
                       task: str = "standard", split: str = "train", params=None, name: str = "hscr") -> Path:
    """``hscr generate`` on ``n_items`` training items of ``task`` from ``data_seed`` into ``workdir/name``."""
    from hscr_client import HSCRParams
    from hscr_worker.fixture.items import write_items
    from hscr_worker.generate import generate_dataset, load_backend

    out = workdir / name
    if (out / "manifest.json").exists():
        return out
    items = workdir / "items" / "items.jsonl"
    if not items.exists():
        write_items(n_items, data_seed, items, workdir / "items" / "images", task=task, split=split)
    log(f"generating {name} data for {n_items} items (seed {data_seed})")
    manifest = generate_dataset(load_backend("transformers", resolve_model(model)), str(items), str(out),
                                params or HSCRParams())
    log(f"{name} data: {manifest['request_counts']}")
    return out


def random_token_levels(text: str, n_levels: int, rng: random.Random, vocabulary: list[str]) -> list[dict]:
    """Level m replaces m random words of ``text`` with random vocabulary words (m = 1..n_levels)."""
    words = text.split()
    order = rng.sample(range(len(words)), len(words))
    levels = []
    for level in range(1, min(n_levels, len(words)) + 1):
        corrupted, replacements = list(words), []
        for position in sorted(order[:level]):
            replacement = rng.choice([w for w in vocabulary if w != words[position]])
            corrupted[position] = replacement
            replacements.append({"position": position, "original": words[position], "replacement": replacement,
                                 "reward": 0.0, "shift": 0.0})
        levels.append({"level": level, "text": " ".join(corrupted), "n_replacements": level, "similarity": None,
                       "unfired": 0, "replacements": replacements})
    return levels


def build_random_dataset(hscr: Path, workdir: Path, seed: int, words: list[str] | None = None) -> Path:
    """The control: HSCR's items and level counts, negatives made by random token replacement (from ``words``;
    default the standard task's vocabulary)."""
    from hscr_client import schema
    from hscr_client.storage import open_location
    from hscr_worker.dataset import parquet_bytes, read_rows

    out = workdir / "random"
    if (out / "manifest.json").exists():
        return out
    rng = random.Random(seed)
    vocabulary = [w for w in words or synthetic.vocabulary() if w not in ("user", "assistant", ":")]
    rows = []
    for row in read_rows(str(hscr), schema.RANKED):
        row = dict(row, levels=random_token_levels(row["corrupted"], len(row["levels"]), rng, vocabulary))
        rows.append(row)
    location = open_location(str(out))
    location.write_bytes("ranked/part-00000.parquet", parquet_bytes(rows, schema.RANKED))
    pairs = [p for row in rows for p in schema.pair_rows(row)]
    location.write_bytes("pairs/part-00000.parquet", parquet_bytes(pairs, schema.PAIRS))
    location.write_bytes("manifest.json", json.dumps({"configs": {"ranked": {"rows": len(rows)}},
                                                      "source": str(hscr), "seed": seed}).encode())
    return out


def describe_hscr_data(hscr: Path, items_path: Path) -> dict:
    """What the HSCR data holds, against the items' ground truth (explains the table)."""
    from collections import Counter

    from hscr_client import schema
    from hscr_worker.dataset import read_rows

    from .evaluation import hallucinated_findings

    truth = {}
    with open(items_path, encoding="utf-8") as f:
        for line in f:
            item = json.loads(line)
            truth[item["custom_id"]] = (item["qtype"], item["attributes"])
    rows = read_rows(str(hscr), schema.RANKED)
    own_wrong, wording_only = 0, 0
    replaced, levels, errors, hallucinating = Counter(), Counter(), Counter(), Counter()
    for row in rows:
        qtype, attrs = truth[row["custom_id"]]
        own_errors = synthetic.count_errors(row["own_answer"], qtype, attrs)
        own_wrong += bool(own_errors)
        # The preferred answer is the ground truth, whose free wording (shows/reveals, region/zone) is random.
        wording_only += own_errors == 0 and row["own_answer"].split() != row["chosen"].split()
        slots = synthetic.word_slots(row["corrupted"], qtype) or []
        for level in row["levels"]:
            levels[level["level"]] += 1
            errors[level["level"]] += synthetic.count_errors(level["text"], qtype, attrs) or 0
            hallucinating[level["level"]] += bool(hallucinated_findings(level["text"], qtype, attrs))
            for replacement in level["replacements"]:
                position = replacement["position"]
                slot = slots[position] if position < len(slots) else None
                replaced[(slot or "template").rstrip("01")] += 1
    return {"items_with_levels": len(rows), "own_answer_wrong": round(own_wrong / len(rows), 3),
            "own_answer_right_but_worded_unlike_chosen": round(wording_only / len(rows), 3),
            "items_by_level_count": dict(Counter(len(r["levels"]) for r in rows)),
            "mean_errors_by_level": {k: round(errors[k] / n, 2) for k, n in sorted(levels.items())},
            "hallucinating_share_by_level": {k: round(hallucinating[k] / n, 2) for k, n in sorted(levels.items())},
            "replaced_word_kinds": dict(replaced.most_common())}


def train_one(dataset: Path, loss_type: str, seed: int, run_dir: Path, hyper: dict,
              ref_cache: Path, model: str = "fixture") -> Path:
    """Train one model; the reference log-probs of ``dataset`` are computed once and reused by every run."""
    from .hscr_config import HSCRConfig
    from .hscr_trainer import HSCRTrainer

    final = run_dir / "final"
    if (final / "config.json").exists():
        return final
    config = HSCRConfig(output_dir=str(run_dir), loss_type=loss_type, seed=seed, data_seed=seed, use_peft=False,
                        use_cpu=True, save_strategy="no", logging_steps=10, disable_tqdm=True, **hyper)
    ref_logps = json.loads(ref_cache.read_text()) if ref_cache.exists() else None
    trainer = HSCRTrainer(model, config, str(dataset), ref_logps=ref_logps)
    if ref_logps is None:
        trainer.ref_logps = trainer.compute_ref_logps()
        ref_cache.write_text(json.dumps(trainer.ref_logps))
    trainer.train()
    trainer.save_state()
    trainer.save_final(str(final))
    return final


def run_grid(results: dict, seeds: list[int], methods: list[str], model: str, *, save, train, score, describe) -> None:
    """Score the base ``model`` and train then score every method, for every seed, into ``results["runs"]``
    (method -> seed -> scores); what is there already is kept, so a rerun picks up where a run stopped.

    ``train(method, seed)`` -> the trained model's directory; ``score(model, seed)`` -> its scores;
    ``describe(scores)`` -> the log line's figures; ``save()`` after every entry."""
    for seed in seeds:
        key = str(seed)
        base = results["runs"].setdefault("base", {})
        if key not in base:
            base[key] = score(model, seed)
            save()
            log(f"base seed {seed}: {describe(base[key])}")
        for method in methods:
            runs = results["runs"].setdefault(method, {})
            if key in runs:
                continue
            started = time.time()
            final = train(method, seed)
            runs[key] = {**score(str(final), seed), "seconds": round(time.time() - started, 1)}
            save()
            log(f"{method} seed {seed}: {describe(runs[key])} ({runs[key]['seconds']} s)")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def metric(run: dict, name: str) -> float:
    if name == "hallucination_wellformed":  # malformed answers assert nothing: do not let them lower the rate
        return run["hallucination"] / (1 - run["malformed"]) if run["malformed"] < 1 else 0.0
    return run[name]


def summarize(results: dict) -> str:
    """Markdown table: mean +- std over seeds (in %), and the paired difference to base."""
    seeds = sorted(results["runs"]["base"])
    lines = ["| method | exact | hallucination | hallucination among well-formed | malformed | exact - base "
             "| hallucination - base |", "|---|---|---|---|---|---|---|"]
    for method in ["base", *METHODS]:
        runs = results["runs"].get(method, {})
        done = [s for s in seeds if s in runs]
        if not done:
            lines.append(f"| {method} | (not run) | | | | | |")
            continue
        cells = []
        for name in (*METRICS[:2], "hallucination_wellformed", METRICS[2]):
            m, s = mean_std([100 * metric(runs[x], name) for x in done])
            cells.append(f"{m:.1f} ± {s:.1f}")
        for name in ("exact", "hallucination"):
            if method == "base":
                cells.append("")
                continue
            m, s = mean_std([100 * (runs[x][name] - results["runs"]["base"][x][name]) for x in done])
            cells.append(f"{m:+.1f} ± {s:.1f}")
        seeds_note = "" if len(done) == len(seeds) else f" ({len(done)}/{len(seeds)} seeds)"
        lines.append(f"| {method}{seeds_note} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hscr-repro"))
    parser.add_argument("--model", default="fixture",
                        help="the base model: fixture (LLaVA), fixture-qwen2.5-vl, fixture-gemma3, or a directory "
                             "(one workdir each)")
    parser.add_argument("--items", type=int, default=2000, help="training items given to hscr generate")
    parser.add_argument("--data-seed", type=int, default=2025)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--eval-items", type=int, default=300)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--gamma", type=float, default=0.1)
    parser.add_argument("--nll-weight", type=float, default=0.0, help="add the NLL term to every trained method")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = parser.parse_args(argv)
    eval_seeds = {s: EVAL_SEED_BASE + s for s in args.seeds}
    if args.data_seed == TRAIN_SEED or args.data_seed in eval_seeds.values():
        raise SystemExit(f"--data-seed {args.data_seed} collides with the training or an eval seed")

    import torch

    from .evaluation import evaluate_fixture

    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results_path = args.workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
    if results.get("settings", {}).get("model", "fixture") != args.model:
        raise SystemExit(f"{args.workdir} holds runs of --model {results['settings'].get('model', 'fixture')}; "
                         f"give --model {args.model} its own --workdir")
    hyper = {"num_train_epochs": args.epochs, "per_device_train_batch_size": args.batch_size,
             "learning_rate": args.lr, "gamma": args.gamma, "nll_weight": args.nll_weight,
             "lr_scheduler_type": "cosine", "warmup_steps": 0.1}
    results["settings"] = {**vars(args), "workdir": str(args.workdir), "eval_seeds": eval_seeds, **hyper}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        (args.workdir / "table.md").write_text(summarize(results))

    hscr = build_hscr_dataset(args.workdir, args.items, args.data_seed, args.model)
    control = build_random_dataset(hscr, args.workdir, args.data_seed)
    manifest = json.loads((hscr / "manifest.json").read_text())
    results["data"] = {"hscr": manifest["request_counts"], "hscr_parameters": manifest["parameters"],
                       **describe_hscr_data(hscr, args.workdir / "items" / "items.jsonl")}
    datasets = {"hscr": hscr, "random": control}

    def train(method: str, seed: int) -> Path:
        dataset, loss_type = METHODS[method]
        return train_one(datasets[dataset], loss_type, seed, args.workdir / "runs" / f"{method}-{seed}", hyper,
                         args.workdir / f"ref-logps-{dataset}.json", args.model)

    run_grid(results, args.seeds, args.methods, args.model, save=save, train=train,
             score=lambda model, seed: evaluate_fixture(model, n=args.eval_items, seed=eval_seeds[seed]),
             describe=lambda run: f"exact {run['exact']} hallucination {run['hallucination']}")
    results["training"] = final_training_logs(args.workdir / "runs")
    save()
    print(summarize(results))
    return results


def final_training_logs(runs: Path) -> dict:
    """The last logged training metrics of every run (margins, accuracies, chosen reward and log-prob)."""
    logs = {}
    for state_path in sorted(runs.glob("*/trainer_state.json")):
        history = [h for h in json.loads(state_path.read_text())["log_history"] if "loss" in h]
        if history:
            logs[state_path.parent.name] = {k: round(v, 4) for k, v in history[-1].items()
                                            if k.split("/")[0] in ("loss", "margins", "accuracies", "rewards", "logps")}
    return logs


if __name__ == "__main__":
    main()
