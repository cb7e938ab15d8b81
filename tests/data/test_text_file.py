"""data=text_file: samples from .txt paragraphs or lines and .jsonl rows, padded right, labels -100 on padding."""

import json

import pytest
import torch

from lightning_lowvram.data import TextFileDataModule


def _batches(data, stage="fit"):
    data.setup(stage)
    return list(data.train_dataloader())


def test_paragraphs_become_padded_samples_with_masked_labels(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("a short one\n\na much longer second sample\nover two lines\n\n\nthird")
    data = TextFileDataModule(str(path), batch_size=8, val_fraction=0.0)
    assert [t for t, _ in data.samples] == ["a short one", "a much longer second sample\nover two lines", "third"]
    (batch,) = _batches(data)
    lengths = batch["attention_mask"].sum(1)
    assert sorted(lengths.tolist()) == sorted(len(t.encode()) + 1 for t, _ in data.samples)  # bytes and </s>
    assert torch.equal(batch["labels"], batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    assert (batch["input_ids"][batch["attention_mask"] == 0] == data.tokenizer.pad_token_id).all()


def test_lines_without_blank_lines_are_samples_and_truncation_and_the_split_hold(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("\n".join(f"line {i} " + "x" * i for i in range(20)))
    data = TextFileDataModule(str(path), max_length=8, batch_size=4, val_fraction=0.25)
    data.setup("fit")
    assert len(data.samples) == 20 and len(data.val) == 5 and len(data.train) == 15
    assert max(len(r["input_ids"]) for r in data.train + data.val) == 8


def test_jsonl_rows_with_labels_for_a_classifier(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"text": "good", "label": 1}, {"text": "bad", "label": 0}, {"review": "no text field"}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]))
    data = TextFileDataModule(str(path), label_field="label", val_fraction=0.0)
    (batch,) = _batches(data)
    assert sorted(batch["labels"].tolist()) == [0, 1] and batch["labels"].shape == (2,)
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=r"line 3 has no 'text' and 'label'"):
        TextFileDataModule(str(path), label_field="label")


def test_bad_input_names_the_argument(tmp_path):
    with pytest.raises(ValueError, match=f"^path={tmp_path}/missing.txt: no such file"):
        TextFileDataModule(str(tmp_path / "missing.txt"))
    with pytest.raises(ValueError, match="^path=null: give your text"):
        TextFileDataModule()
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(ValueError, match="empty.txt: has no text"):
        TextFileDataModule(str(tmp_path / "empty.txt"))
    (tmp_path / "ok.txt").write_text("some text")
    with pytest.raises(ValueError, match=r"^tokenizer=./no-tokenizer: neither a local directory with a tokenizer"):
        TextFileDataModule(str(tmp_path / "ok.txt"), tokenizer="./no-tokenizer")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        TextFileDataModule(str(tmp_path / "ok.txt"), batch_size=0)
