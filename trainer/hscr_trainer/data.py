"""Stream HSCR preference items from a dataset directory or S3 prefix, and collate them into batches.

An *item* is one image-question with its ranked responses: ``responses[0]`` is the preferred answer,
``responses[j]`` the level-j dispreferred answer (1 = mildest error). The ``ranked`` config gives
items directly; ``pairs`` rows (TRL's format) are regrouped per ``custom_id`` by their level columns.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator
from itertools import groupby

import pyarrow.parquet as pq
import torch
from PIL import Image

from hscr_client import schema
from hscr_client.storage import Location, open_location

READ_BATCH_ROWS = 64


def message_text(messages: list[dict]) -> str:
    """The text of a one-turn conversational message list (TRL's vision format)."""
    return " ".join(part["text"] for message in messages for part in message["content"]
                    if part.get("type") == "text" and part.get("text"))


def decode_image(cell) -> Image.Image:
    if isinstance(cell, Image.Image):
        return cell
    if isinstance(cell, dict) and cell.get("bytes"):
        return Image.open(io.BytesIO(cell["bytes"]))
    raise ValueError("image cell holds no bytes (reference-only images are not supported by the trainer yet)")


def item_from_ranked(row: dict, max_levels: int | None = None) -> dict:
    levels = sorted(row["levels"], key=lambda lv: lv["level"])[:max_levels]
    return {"custom_id": row["custom_id"], "prompt": schema.user_turn(row["question"]), "image": row["image"],
            "responses": [row["chosen"], *(lv["text"] for lv in levels)]}


def items_from_pairs(rows: list[dict], max_levels: int | None = None) -> list[dict]:
    """Regroup one item's ``pairs`` rows into a ranked item; rows without level columns stay pairwise."""
    first = rows[0]
    if first.get("chosen_level") is None or first.get("rejected_level") is None:
        return [{"custom_id": r["custom_id"], "prompt": r["prompt"], "image": r["images"][0],
                 "responses": [message_text(r["chosen"]), message_text(r["rejected"])]} for r in rows]
    by_level: dict[int, str] = {}
    for r in rows:
        by_level.setdefault(r["chosen_level"], message_text(r["chosen"]))
        by_level.setdefault(r["rejected_level"], message_text(r["rejected"]))
    if 0 not in by_level:  # only implicit pairs survived: the mildest level plays the preferred answer
        by_level = {i: by_level[level] for i, level in enumerate(sorted(by_level))}
    levels = sorted(level for level in by_level if level > 0)[:max_levels]
    return [{"custom_id": first["custom_id"], "prompt": first["prompt"], "image": first["images"][0],
             "responses": [by_level[0], *(by_level[level] for level in levels)]}]


class PreferenceStream(torch.utils.data.IterableDataset):
    """Items of one config of an HSCR dataset, read shard by shard (never the whole dataset at once).

    Each epoch visits the shards in a seeded random order and shuffles items in a buffer of
    ``shuffle_buffer``; the order is a pure function of ``(seed, epoch)``, so a resumed run that skips
    the batches it already trained on sees exactly the items an uninterrupted run would.
    """

    def __init__(self, uri: str, config: str = schema.RANKED, *, seed: int = 0, shuffle_buffer: int = 10000,
                 max_levels: int | None = None):
        if config not in schema.CONFIGS:
            raise ValueError(f"unknown config {config!r}; expected one of {schema.CONFIGS}")
        self.uri, self.config, self.seed = uri, config, seed
        self.shuffle_buffer, self.max_levels = shuffle_buffer, max_levels
        self.epoch = 0
        self.shards = self._location().list(config)
        if not self.shards:
            raise FileNotFoundError(f"no {config} shards under {uri!r} (expected {config}/part-*.parquet)")
        self._length: int | None = None

    def _location(self) -> Location:
        return open_location(self.uri)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        if self._length is None:
            location = self._location()
            if self.config == schema.RANKED:
                self._length = sum(pq.ParquetFile(location.fs.open_input_file(location.path(s))).metadata.num_rows
                                   for s in self.shards)
            else:
                self._length = sum(self._count_pair_items(rows) for s in self.shards
                                   for rows in self._row_batches(location, s, columns=["custom_id", "chosen_level"]))
        return self._length

    def _row_batches(self, location: Location, shard: str, columns: list[str] | None = None) -> Iterator[list[dict]]:
        with location.fs.open_input_file(location.path(shard)) as handle:
            parquet = pq.ParquetFile(handle)
            present = set(parquet.schema_arrow.names)
            columns = [c for c in columns if c in present] if columns else None
            if self.config == schema.PAIRS:  # an item's pairs must not straddle a read batch
                yield parquet.read(columns=columns).to_pylist()
                return
            for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=columns):
                yield batch.to_pylist()

    @staticmethod
    def _count_pair_items(rows: list[dict]) -> int:
        if not rows or rows[0].get("chosen_level") is None:
            return len(rows)
        return sum(1 for _ in groupby(rows, key=lambda r: r["custom_id"]))

    def _items_of(self, rows: list[dict]) -> list[dict]:
        if self.config == schema.RANKED:
            return [item_from_ranked(r, self.max_levels) for r in rows]
        return [item for _, group in groupby(rows, key=lambda r: r["custom_id"])
                for item in items_from_pairs(list(group), self.max_levels)]

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(f"{self.seed}-{self.epoch}")
        worker = torch.utils.data.get_worker_info()
        worker_id, n_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        location = self._location()
        shards = list(self.shards)
        rng.shuffle(shards)
        buffer: list[dict] = []
        index = 0
        for shard in shards:
            for rows in self._row_batches(location, shard):
                for item in self._items_of(rows):
                    index += 1
                    if (index - 1) % n_workers != worker_id:
                        continue
                    buffer.append(item)
                    if len(buffer) >= self.shuffle_buffer:
                        yield self._ready(buffer.pop(rng.randrange(len(buffer))))
        rng.shuffle(buffer)
        for item in buffer:
            yield self._ready(item)

    @staticmethod
    def _ready(item: dict) -> dict:
        return {**item, "image": decode_image(item["image"]).convert("RGB")}


def sequence_key(item: dict, response: str) -> str:
    return f"{item.get('custom_id')}\x00{response}"


# Batch keys the collator adds for the loss; every other key is a model input (``sequence_logps``).
BOOKKEEPING_KEYS = frozenset({"completion_mask", "item_index", "level_index", "level_mask", "sequence_keys"})
# Processor outputs with one value per token (padded along the sequence like ``input_ids``): Qwen2-VL's
# ``mm_token_type_ids`` (which tokens are image placeholders; the model needs it for M-RoPE positions)
# and Gemma-style ``token_type_ids``. Every other processor output is image input, one entry per image.
PER_TOKEN_KEYS = ("attention_mask", "mm_token_type_ids", "token_type_ids")


class PreferenceCollator:
    """Tokenize items into one flat batch of sequences: every response of every item, right-padded.

    Output (N = total responses in the batch, L = longest sequence):
    ``input_ids``/``attention_mask`` ``(N, L)``; ``completion_mask`` ``(N, L)`` bool, True on response
    tokens; every image input the processor makes, each sequence holding its item's image once:
    LLaVA's ``pixel_values`` ``(N, 3, H, W)``; Qwen2-VL's ``pixel_values`` ``(sum of patches, D)``
    with ``image_grid_thw`` ``(N, 3)`` and the per-token ``mm_token_type_ids`` ``(N, L)``; Gemma 3's
    ``pixel_values`` ``(N, 3, H, W)`` with ``token_type_ids`` ``(N, L)`` (its image attention is bidirectional);
    ``item_index``/``level_index`` ``(N,)`` where each sequence goes in the ``(B, K+1)`` level grid;
    ``level_mask`` ``(B, K+1)`` bool; ``sequence_keys`` (N strings) name each (item, response) pair, for
    precomputed reference log-probs.

    ``family`` (``hscr_worker.families``) builds the prompt and prepares the image exactly as the
    generation backends do, so the model trains on the prompts it generated the dataset from; without
    one, the processor's chat template renders the item's prompt messages.
    """

    def __init__(self, processor, max_length: int | None = None, family=None):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None \
            else self.tokenizer.eos_token_id
        self.max_length = max_length
        self.family = family

    def prompt_text(self, prompt: list[dict]) -> str:
        if self.family is None:
            return self.processor.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        question = self.family.clean_question(self.processor, message_text(prompt))
        return self.family.processor_prompt(self.processor, question)

    def completion_ids(self, prompt: list[dict], prompt_text: str, response: str) -> list[int]:
        """Response tokens as the chat template renders the assistant turn (end-of-turn tokens included);
        the response and EOS when there is no chat template or the prompt is not the template's."""
        completion = response + self.tokenizer.eos_token
        if getattr(self.processor, "chat_template", None):
            full = self.processor.apply_chat_template(prompt + schema.assistant_turn(response), tokenize=False)
            if full.startswith(prompt_text):
                completion = full[len(prompt_text):]
        return list(self.tokenizer(completion, add_special_tokens=False)["input_ids"])

    def encode_prompt(self, item: dict) -> tuple[str, dict[str, torch.Tensor]]:
        prompt_text = self.prompt_text(item["prompt"])
        image = item["image"]
        if self.family is not None:
            image = self.family.prepare_images(self.processor, [image])[0]
            return prompt_text, self.family.processor_inputs(self.processor, prompt_text, image)
        encoded = self.processor(text=[prompt_text], images=[image], return_tensors="pt")
        return prompt_text, dict(encoded)

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        sequences, completions, item_index, level_index, keys = [], [], [], [], []
        per_token: dict[str, list[list[int]]] = {}
        images: dict[str, list[torch.Tensor]] = {}
        widest = max(len(item["responses"]) for item in items)
        level_mask = torch.zeros(len(items), widest, dtype=torch.bool)
        for b, item in enumerate(items):
            prompt_text, encoded = self.encode_prompt(item)
            prompt_ids = encoded["input_ids"][0].tolist()
            for level, response in enumerate(item["responses"]):
                completion = self.completion_ids(item["prompt"], prompt_text, response)
                ids = prompt_ids + completion
                if self.max_length and len(ids) > self.max_length:
                    raise ValueError(f"item {item.get('custom_id')!r}: {len(ids)} tokens exceed max_length "
                                     f"{self.max_length}")
                sequences.append(ids)
                completions.append(len(completion))
                for key, value in encoded.items():
                    if key == "input_ids" or key == "attention_mask" or not isinstance(value, torch.Tensor):
                        continue
                    if key in PER_TOKEN_KEYS:  # response tokens are text: type 0
                        per_token.setdefault(key, []).append(value[0].tolist() + [0] * len(completion))
                    else:  # one image per sequence: its rows (LLaVA: one; Qwen: its patches)
                        images.setdefault(key, []).append(value)
                item_index.append(b)
                level_index.append(level)
                keys.append(sequence_key(item, response))
                level_mask[b, level] = True
        length = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
        completion_mask = torch.zeros((len(sequences), length), dtype=torch.bool)
        for row, (ids, n_completion) in enumerate(zip(sequences, completions, strict=True)):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
            completion_mask[row, len(ids) - n_completion: len(ids)] = True
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        for key, rows in per_token.items():
            padded = torch.zeros((len(rows), length), dtype=torch.long)
            for row, values in enumerate(rows):
                padded[row, : len(values)] = torch.tensor(values)
            batch[key] = padded
        batch.update({key: torch.cat(values) for key, values in images.items()})
        return {**batch, "completion_mask": completion_mask, "item_index": torch.tensor(item_index),
                "level_index": torch.tensor(level_index), "level_mask": level_mask, "sequence_keys": keys}


def select_sequences(batch: dict, rows: torch.Tensor) -> dict:
    """The sub-batch of sequences ``rows`` (indices into the ``N`` sequences) with their images: what
    ``sequence_logps`` needs (model inputs, ``completion_mask``, ``sequence_keys``)."""
    n = batch["input_ids"].shape[0]
    grid = batch.get("image_grid_thw")
    out: dict = {"sequence_keys": [batch["sequence_keys"][i] for i in rows.tolist()]}
    for key, value in batch.items():
        if key in BOOKKEEPING_KEYS and key != "completion_mask" or not isinstance(value, torch.Tensor):
            continue
        if grid is not None and key == "pixel_values":  # Qwen2-VL: each image's patches, back to back
            parts = value.split(grid.prod(-1).tolist())
            out[key] = torch.cat([parts[i] for i in rows.tolist()])
        elif value.shape[0] == n:
            out[key] = value[rows]
        else:
            raise ValueError(f"cannot select sequences from batch key {key!r} of shape {tuple(value.shape)}")
    return out
