"""Your own text as token batches: a ``.txt`` or ``.jsonl`` file, tokenized, padded, labelled (``data=text_file``).

A ``.jsonl`` file holds one sample a line (``{"text": ...}``, and ``{"label": ...}`` for a classifier); a ``.txt``
file holds samples separated by blank lines (a file without blank lines: one sample a line). Each sample is
tokenized and truncated to ``max_length``; a batch is right-padded, with an ``attention_mask`` and ``labels``: the
ids with -100 on padding (what a HF causal LM's loss ignores), or the samples' labels with ``label_field``.

The tokenizer is a local directory or a Hub id (``AutoTokenizer``; offline, only what is cached), or ``None``/``byte``
for transformers' byte tokenizer (``ByT5Tokenizer``: 259 ids, no vocabulary file, no download).

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
    >>> _ = path.write_text(chr(10).join(["first sample", "", "second one", "", "third"]))
    >>> data = TextFileDataModule(str(path), batch_size=2, val_fraction=0.0)
    >>> data.setup("fit")
    >>> batch = next(iter(data.train_dataloader()))
    >>> sorted(batch), batch["input_ids"].shape[0]
    (['attention_mask', 'input_ids', 'labels'], 2)

"""

from __future__ import annotations

import json
import os
import random
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader


def load_tokenizer(tokenizer: str | None) -> Any:
    """A tokenizer with a pad token: the byte tokenizer for ``None``/``"byte"``, else ``AutoTokenizer``'s.

    Raises:
        ValueError: A tokenizer that is neither a local directory nor one Hugging Face can load here.

    """
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - an install without the extra
        raise ImportError("text data needs transformers' tokenizers: pip install 'lightning-lowvram[hf]'") from err
    if tokenizer in (None, "byte"):
        loaded = transformers.ByT5Tokenizer(extra_ids=0)
    else:
        try:
            loaded = transformers.AutoTokenizer.from_pretrained(tokenizer)
        except (OSError, ValueError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"tokenizer={tokenizer}: neither a local directory with a tokenizer nor one Hugging Face can load here "
                f"({reason}); tokenizer=byte needs no files"
            ) from err
    if loaded.pad_token_id is None:
        loaded.pad_token = loaded.eos_token  # causal LMs often ship without one; padding is masked anyway
    return loaded


def read_samples(path: str | None, text_field: str = "text", label_field: str | None = None) -> list[tuple[str, Any]]:
    """``(text, label)`` of every sample in a ``.jsonl`` or ``.txt`` file (``label`` ``None`` without a field).

    Raises:
        ValueError: No such file, a JSON line without the field, or no text at all.

    """
    if path is None:
        raise ValueError("path=null: give your text, a .txt or .jsonl file (data.path=my.txt)")
    if not os.path.isfile(path):
        raise ValueError(f"path={path}: no such file (a .txt or .jsonl file of your text)")
    with open(path, encoding="utf-8") as f:
        content = f.read()
    if path.endswith((".jsonl", ".json")):
        samples = []
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"path={path}: line {number} is not JSON ({err.msg})") from err
            if not isinstance(row, dict) or text_field not in row or (label_field and label_field not in row):
                wanted = f"{text_field!r}" + (f" and {label_field!r}" if label_field else "")
                raise ValueError(f"path={path}: line {number} has no {wanted} (text_field, label_field)")
            samples.append((str(row[text_field]), row[label_field] if label_field else None))
    else:
        if label_field:
            raise ValueError(f"path={path}: a .txt file has no labels; label_field needs a .jsonl file")
        parts = content.split("\n\n") if "\n\n" in content.strip() else content.splitlines()
        samples = [(part.strip(), None) for part in parts if part.strip()]
    samples = [(text, label) for text, label in samples if text.strip()]
    if not samples:
        raise ValueError(f"path={path}: has no text")
    return samples


class TextFileDataModule(L.LightningDataModule):
    """Token batches from a text file, split into training and validation samples.

    Args:
        path: A ``.txt`` or ``.jsonl`` file.
        tokenizer: A local directory or Hub id, or ``None``/``"byte"`` (the byte tokenizer, no files).
        max_length: Tokens a sample is truncated to.
        batch_size: Samples a batch.
        val_fraction: Fraction of the samples held out for validation (0: none).
        text_field: The text's key in a ``.jsonl`` line.
        label_field: The label's key in a ``.jsonl`` line, for a sequence classifier (``None``: causal LM labels).
        seed: The shuffle before the split.

    Raises:
        ValueError: A file that does not exist or has no text, a tokenizer that cannot be loaded, or a size out of
            range, naming the argument.

    """

    def __init__(
        self,
        path: str | None = None,
        tokenizer: str | None = None,
        max_length: int = 128,
        batch_size: int = 8,
        val_fraction: float = 0.1,
        text_field: str = "text",
        label_field: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        for key, value in (("max_length", max_length), ("batch_size", batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
        if isinstance(val_fraction, bool) or not isinstance(val_fraction, int | float) or not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be a number in [0, 1), got {val_fraction!r}")
        self.path, self.max_length, self.batch_size, self.val_fraction = path, max_length, batch_size, val_fraction
        self.label_field, self.seed = label_field, seed
        self.samples = read_samples(path, text_field, label_field)
        self.tokenizer = load_tokenizer(tokenizer)
        self.train: list[dict[str, Any]] = []
        self.val: list[dict[str, Any]] = []

    def setup(self, stage: str) -> None:
        if self.train:
            return
        rows = [self._encode(text, label) for text, label in self.samples]
        random.Random(self.seed).shuffle(rows)
        held = round(len(rows) * self.val_fraction) if len(rows) > 1 else 0
        self.val, self.train = rows[:held], rows[held:]

    def _encode(self, text: str, label: Any) -> dict[str, Any]:
        ids = self.tokenizer(text, truncation=True, max_length=self.max_length)["input_ids"]
        return {"input_ids": ids, "label": label}

    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Right-pad a list of encoded samples; labels are the ids with -100 on padding, or the samples' labels."""
        width = max(len(r["input_ids"]) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row["input_ids"])] = torch.tensor(row["input_ids"])
            mask[i, : len(row["input_ids"])] = 1
        if self.label_field:
            labels = torch.tensor([int(r["label"]) for r in rows])
        else:
            labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, collate_fn=self.collate)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=self.batch_size, collate_fn=self.collate)
