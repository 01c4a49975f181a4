"""The language-prior benchmark: does HSCR data teach a model to answer from the image against a language prior?

``hscr reproduce prior`` (or ``python -m hscr_trainer.reproduce_prior``) runs, in ``--workdir``:

1. ``--items`` training items of the prior task (``hscr_worker.fixture.prior``) from ``--data-seed``, of split
   ``--data-split`` (default ``balanced``: the clinical history says nothing of the image); ``--train-share`` draws
   that share from the ``train`` split instead (the history implies the lesion kind on 65 % of them);
2. ``hscr generate`` on them with ``fixture-prior`` at the shipped defaults (``hscr``), and with each pair option of
   ``DATASETS`` a method needs; the random-negative control of ``reproduce.py`` (``random``);
3. for each seed, every method of ``METHODS`` trained from ``fixture-prior`` with identical hyper-parameters;
4. base and every trained model scored on ``--eval-items`` counter-prior items (the image contradicts the history)
   and as many in-prior items, from seeds no other step uses;
5. ``results.json`` (per seed, per item) and ``table.md``: mean +- sample std over seeds, and paired bootstrap 95 %
   CIs (items resampled within each seed, the same items for both sides) of the difference to base, to SFT and to
   DPO on random negatives. ``results.json`` → ``negatives``: how far each dataset's negatives lean toward the
   history's answer (``negative_prior_share``).

Finished steps are reused when the command runs again (delete an entry of ``results.json`` to redo it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from .reproduce import build_hscr_dataset, build_random_dataset, run_grid, train_one

COUNTER_SEED_BASE, IN_PRIOR_SEED_BASE = 8000, 8500  # eval items of seed s: base + s (counter-prior, in-prior)
# HSCR datasets: name -> the HSCRParams that differ from the shipped defaults.
# "hscr-minimal-pair": each level is the own answer with its replaced tokens swapped in place (no re-decode), against
# the own answer where it is right: the pair differs exactly at the hallucinated tokens (bench/minimal_edit.py).
DATASETS: dict[str, dict] = {"hscr": {}, "hscr-own": {"chosen": "own"}, "hscr+own-rejected": {"own_rejected": True},
                             "hscr-minimal-pair": {"chosen": "own", "replace_mode": "splice"}}
# name -> (dataset, loss_type, extra trainer settings). "dpo-*": one pair per item (level 1), as plain DPO.
METHODS: dict[str, tuple[str, str, dict]] = {
    "sft": ("hscr", "sft", {}),
    "dpo-random": ("random", "explicit", {"max_levels": 1}),
    "dpo-hscr": ("hscr", "explicit", {"max_levels": 1}),
    "explicit": ("hscr", "explicit", {}),
    "implicit": ("hscr", "implicit", {}),
    "explicit+implicit": ("hscr", "explicit,implicit", {}),
    "explicit+implicit+rpo": ("hscr", "explicit,implicit", {"nll_weight": 1.0}),
    # What `hscr train --model fixture-prior` does with no flag: the paper's losses (HSCRConfig's loss_type "hscr")
    # with the settings of the model's hscr_training.json that differ from the harness's (a test keeps them equal).
    "hscr-train-default": ("hscr", "explicit,implicit", {"nll_weight": 2.0, "num_train_epochs": 1.5}),
    "explicit+implicit+dpop": ("hscr", "explicit,implicit", {"dpop_lambda": 50.0}),
    "mdpo+implicit": ("hscr", "explicit,implicit,anchor,image_conditional", {}),
    "mdpo+implicit+rpo": ("hscr", "explicit,implicit,anchor,image_conditional", {"nll_weight": 1.0}),
    "on-policy explicit+implicit": ("hscr-own", "explicit,implicit", {}),
    "own-rejected explicit+implicit": ("hscr+own-rejected", "explicit,implicit", {}),
    "own-rejected explicit+implicit+rpo": ("hscr+own-rejected", "explicit,implicit", {"nll_weight": 1.0}),
    # Recipes tried against SFT (docs/trainer.md, "Recipes tried"): a larger gamma, a lighter NLL anchor, the explicit
    # term alone, mDPO's image-conditional term alone with the anchor, and the vision encoder unfrozen (SFT too).
    "explicit+implicit+rpo gamma0.5": ("hscr", "explicit,implicit", {"nll_weight": 1.0, "gamma": 0.5}),
    "explicit+implicit+rpo nll0.3": ("hscr", "explicit,implicit", {"nll_weight": 0.3}),
    "explicit+implicit+rpo nll2": ("hscr", "explicit,implicit", {"nll_weight": 2.0}),
    "explicit+rpo": ("hscr", "explicit", {"nll_weight": 1.0}),
    "own-rejected explicit+rpo": ("hscr+own-rejected", "explicit", {"nll_weight": 1.0}),
    "image_conditional+rpo": ("hscr", "image_conditional", {"nll_weight": 1.0}),
    "sft unfrozen-vision": ("hscr", "sft", {"freeze_vision_tower": False}),
    "explicit+implicit+rpo unfrozen-vision": ("hscr", "explicit,implicit",
                                              {"nll_weight": 1.0, "freeze_vision_tower": False}),
    "hscr-train-default unfrozen-vision": ("hscr", "explicit,implicit", {"nll_weight": 2.0, "num_train_epochs": 1.5,
                                                                       "freeze_vision_tower": False}),
    "own-rejected explicit+implicit+rpo unfrozen-vision": ("hscr+own-rejected", "explicit,implicit",
                                                           {"nll_weight": 1.0, "freeze_vision_tower": False}),
    "own-rejected explicit+implicit+image_conditional+rpo": ("hscr+own-rejected", "explicit,implicit,image_conditional",
                                                             {"nll_weight": 1.0}),
    "minimal-pair explicit+implicit+rpo": ("hscr-minimal-pair", "explicit,implicit", {"nll_weight": 1.0}),
}
# The table in docs/trainer.md (Table 5). The rest are one flag away (--methods): chosen='own' gives the same pairs
# on this task (its answers have no free wording), the dpop and un-anchored mDPO rows have no five-seed run yet, and
# the recipes tried have two-seed pilots (none beat SFT).
DEFAULT_METHODS = ["sft", "dpo-random", "dpo-hscr", "explicit", "implicit", "explicit+implicit",
                   "explicit+implicit+rpo", "hscr-train-default", "mdpo+implicit+rpo",
                   "own-rejected explicit+implicit+rpo"]
CONTROLS = ("base", "sft", "dpo-random")
# The harness's trainer settings; --epochs, --batch-size, --lr and --gamma override the first four. Each method names
# its terms, so the NLL anchor is off here: "+rpo" adds it, "sft" is it alone.
SETTINGS = {"num_train_epochs": 2.0, "per_device_train_batch_size": 8, "learning_rate": 5e-5, "gamma": 0.1,
            "lr_scheduler_type": "cosine", "warmup_steps": 0.1, "nll_weight": 0.0}


def evaluate(model: str, n: int, seed: int, split: str) -> dict:
    """Prior-task scores of ``model`` on ``split``, with each item's exactness (for the paired bootstrap)."""
    from .evaluation import evaluate_fixture

    return evaluate_fixture(model, n=n, seed=seed, task="prior", split=split, per_item=True)


def split_scores(model: str, seed: int, n: int) -> dict:
    """``evaluate`` on both splits, with the eval items of training seed ``seed`` (``COUNTER_SEED_BASE + seed``,
    ``IN_PRIOR_SEED_BASE + seed``)."""
    return {"counter-prior": evaluate(model, n, COUNTER_SEED_BASE + seed, "counter-prior"),
            "in-prior": evaluate(model, n, IN_PRIOR_SEED_BASE + seed, "in-prior")}


def paired_bootstrap(a: dict[str, list[int]], b: dict[str, list[int]], *, resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """Mean over seeds of ``a - b`` (per-item 0/1 on the same items) and its 95 % CI: items resampled with
    replacement within each seed, one draw shared by both sides."""
    rng = np.random.default_rng(seed)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        raise ValueError("no seed scored on both sides")
    diffs = [np.asarray(a[s], float) - np.asarray(b[s], float) for s in seeds]
    point = float(np.mean([d.mean() for d in diffs]))
    draws = np.mean([d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(1) for d in diffs], axis=0)
    low, high = np.percentile(draws, [2.5, 97.5])
    return point, float(low), float(high)


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.1f} ± {100 * std:.1f}"


def _ci(runs: dict, method: str, against: str, split: str) -> str:
    a = {s: r[split]["correct"] for s, r in runs.get(method, {}).items()}
    b = {s: r[split]["correct"] for s, r in runs.get(against, {}).items()}
    if method == against or not set(a) & set(b):
        return ""
    point, low, high = paired_bootstrap(a, b)
    return f"{100 * point:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}]"


def summarize(results: dict) -> str:
    runs = results["runs"]
    seeds = sorted(runs.get("base", {}))
    lines = ["| method | seeds | counter-prior exact | − base [95 % CI] | − SFT [95 % CI] | − DPO random [95 % CI] "
             "| errors = prior's answer | in-prior exact | in-prior − base [95 % CI] | malformed |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method in ["base", *METHODS]:
        done = [s for s in seeds if s in runs.get(method, {})]
        if not done:
            continue
        rows = [runs[method][s] for s in done]
        counter, in_prior = [r["counter-prior"] for r in rows], [r["in-prior"] for r in rows]
        cells = [method, str(len(done)), _cell([r["exact"] for r in counter]),
                 *(_ci(runs, method, c, "counter-prior") for c in CONTROLS),
                 _cell([r["prior_answer_share"] for r in counter]), _cell([r["exact"] for r in in_prior]),
                 _ci(runs, method, "base", "in-prior"),
                 _cell([(a["malformed"] + b["malformed"]) / 2 for a, b in zip(counter, in_prior, strict=True)])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def negative_prior_share(rows: list[dict], attrs: dict[str, dict]) -> dict:
    """Of the dispreferred levels of ranked ``rows`` that name a wrong value of the prior's attribute (``attrs``: each
    item's ground truth by custom id), the share that name the value the history implies, and that share were each
    level's wrong value drawn uniformly among the item's wrong values (independent of the history): about 1/3 on
    balanced items, where the history's value is wrong on 2/3 of them and then one of two wrong values. Above it, the
    preference terms also teach "not what the history says", an anti-prior the words alone carry."""
    from hscr_worker.fixture import prior

    named = wrong = 0
    expected = 0.0
    for row in rows:
        item = attrs[row["custom_id"]]
        attribute = prior.PRIORS[prior.HISTORY_ATTRIBUTE[item["history"]]]
        counter = prior.value(item) != prior.implied(item["history"])
        for level in row["levels"]:
            said = (prior.synthetic.parse(level["text"], attribute["qtype"]) or {}).get(attribute["slot"])
            if said is not None and said != prior.value(item):
                wrong += 1
                named += said == prior.implied(item["history"])
                expected += counter / (len(attribute["values"]) - 1)
    return {"levels_naming_a_wrong_value": wrong,
            "share_naming_the_history_value": round(named / wrong, 4) if wrong else 0.0,
            "share_if_independent_of_the_history": round(expected / wrong, 4) if wrong else 0.0}


def write_mixed_items(folder: Path, n: int, seed: int, split: str, train_share: float) -> None:
    """``folder/items.jsonl``: ``n`` items, ``round(n * train_share)`` of the ``train`` split from ``seed + 1``, the
    rest of ``split`` from ``seed`` (distinct custom ids: they hold the seed)."""
    from hscr_worker.fixture.items import write_items

    items = folder / "items.jsonl"
    if items.exists():
        return
    folder.mkdir(parents=True, exist_ok=True)
    n_train = round(n * train_share)
    parts = [(n - n_train, seed, split, "main"), (n_train, seed + 1, "train", "train")]
    with open(items, "w", encoding="utf-8") as f:
        for count, part_seed, part_split, tag in parts:
            if count:
                rows = write_items(count, part_seed, folder / f"{tag}.jsonl", folder / "images", task="prior",
                                   split=part_split)
                f.writelines(json.dumps(row) + "\n" for row in rows)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="hscr reproduce prior", description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/hscr-prior"))
    parser.add_argument("--model", default="fixture-prior", help="the base model (trained on the prior task)")
    parser.add_argument("--items", type=int, default=1000, help="training items given to hscr generate")
    parser.add_argument("--data-seed", type=int, default=2026)
    parser.add_argument("--data-split", default="balanced", choices=["balanced", "train"],
                        help="the items given to hscr generate: balanced (the history says nothing of the image) or "
                             "train (the base model's own prior-laden distribution)")
    parser.add_argument("--train-share", type=float, default=0.0,
                        help="this share of the --items comes from the train split (seed --data-seed + 1), the rest "
                             "from --data-split: the prior-laden items in the mix keep the history's evidence")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--eval-items", type=int, default=300, help="per split and seed")
    parser.add_argument("--epochs", type=float, default=SETTINGS["num_train_epochs"])
    parser.add_argument("--batch-size", type=int, default=SETTINGS["per_device_train_batch_size"])
    parser.add_argument("--lr", type=float, default=SETTINGS["learning_rate"])
    parser.add_argument("--gamma", type=float, default=SETTINGS["gamma"])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(METHODS))
    args = parser.parse_args(argv)
    if not 0 <= args.train_share < 1:
        parser.error("--train-share must be in [0, 1)")
    from hscr_worker.fixture.train import TRAIN_SEED

    eval_seeds = {s: (COUNTER_SEED_BASE + s, IN_PRIOR_SEED_BASE + s) for s in args.seeds}
    data_seeds = {args.data_seed, args.data_seed + 1} if args.train_share > 0 else {args.data_seed}
    if data_seeds & {TRAIN_SEED, *(x for pair in eval_seeds.values() for x in pair)}:
        raise SystemExit(f"--data-seed {args.data_seed} collides with the training or an eval seed")

    import torch

    from hscr_client import HSCRParams, schema
    from hscr_worker.dataset import read_rows
    from hscr_worker.fixture import prior

    torch.set_num_threads(args.threads)
    started = time.time()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results_path = args.workdir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"runs": {}}
    hyper = {**SETTINGS, "num_train_epochs": args.epochs, "per_device_train_batch_size": args.batch_size,
             "learning_rate": args.lr, "gamma": args.gamma}
    results["settings"] = {**vars(args), "workdir": str(args.workdir), "eval_seeds": eval_seeds, **hyper}

    def save() -> None:
        results_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        (args.workdir / "table.md").write_text(summarize(results))

    if args.train_share > 0:
        write_mixed_items(args.workdir / "items", args.items, args.data_seed, args.data_split, args.train_share)
    datasets = {}
    for name in DATASETS:
        if name == "hscr" or any(METHODS[m][0] == name for m in args.methods):
            datasets[name] = build_hscr_dataset(args.workdir, args.items, args.data_seed, args.model, task="prior",
                                                split=args.data_split, params=HSCRParams(**DATASETS[name]), name=name)
    datasets["random"] = build_random_dataset(datasets["hscr"], args.workdir, args.data_seed, prior.vocabulary())
    results["data"] = {name: json.loads((path / "manifest.json").read_text()).get("request_counts")
                       for name, path in datasets.items()}
    with open(args.workdir / "items" / "items.jsonl", encoding="utf-8") as f:
        truth = {row["custom_id"]: row["attributes"] for row in map(json.loads, f)}
    results["negatives"] = {name: negative_prior_share(read_rows(str(path), schema.RANKED), truth)
                            for name, path in datasets.items()}

    def scores(model: str, seed: int) -> dict:
        return split_scores(model, seed, args.eval_items)

    def train(method: str, seed: int) -> Path:
        dataset, loss_type, extra = METHODS[method]
        cache = args.workdir / f"ref-logps-{dataset}-{extra.get('max_levels', 'all')}.json"
        return train_one(datasets[dataset], loss_type, seed, args.workdir / "runs" / f"{method}-{seed}",
                         {**hyper, **extra}, cache, args.model)

    run_grid(results, args.seeds, args.methods, args.model, save=save, train=train, score=scores,
             describe=lambda run: f"counter-prior {run['counter-prior']['exact']} in-prior {run['in-prior']['exact']}")
    results["seconds"] = round(time.time() - started, 1) + results.get("seconds", 0)
    save()
    print(summarize(results))
    return results


if __name__ == "__main__":
    main()
