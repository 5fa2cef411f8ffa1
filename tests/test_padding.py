"""The one padding helper (``models.padding.pad_rows``) and the batches built with it."""

import torch

from data.preference import PreferenceCollator, join_pairs
from data.sft import IGNORE_INDEX, SFTCollator
from models.padding import pad_rows


def test_left_and_right_padding():
    rows = [[1, 2, 3], [4], []]
    ids, mask = pad_rows(rows, 0, "left")
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4], [0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 0, 0]]
    ids, mask = pad_rows(rows, -100)  # right by default
    assert ids.tolist() == [[1, 2, 3], [4, -100, -100], [-100, -100, -100]]
    assert mask.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    assert ids.dtype == mask.dtype == torch.long


def test_tensor_rows_and_empty_batches():
    ids, mask = pad_rows([torch.tensor([5, 6]), torch.tensor([7])], 9, "right")
    assert ids.tolist() == [[5, 6], [7, 9]] and mask.tolist() == [[1, 1], [1, 0]]
    ids, mask = pad_rows([[], []], 9, "left")  # every prefix empty: (N, 0)
    assert ids.shape == mask.shape == (2, 0)


def test_sft_collator_batch():
    examples = [{"input_ids": [1, 2, 3], "labels": [-100, 2, 3]}, {"input_ids": [4, 5], "labels": [-100, 5]}]
    batch = SFTCollator(pad_token_id=0)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, 5, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_preference_collator_batch_and_whole_texts():
    examples = [
        {"chosen_ids": [1, 2, 3, 4], "rejected_ids": [1, 2, 5], "p_chosen": 0.75},
        {"chosen_ids": [6, 7], "rejected_ids": [6, 8, 9], "p_chosen": 1.0},
    ]
    batch = PreferenceCollator(pad_token_id=0)(examples)
    assert batch["prompt_ids"].tolist() == [[1, 2], [0, 6]]  # left-padded shared prefixes
    assert batch["prompt_mask"].tolist() == [[1, 1], [0, 1]]
    assert batch["response_ids"].tolist() == [[3, 4], [5, 0], [7, 0], [8, 9]]  # right-padded continuations
    assert batch["response_mask"].tolist() == [[1, 1], [1, 0], [1, 0], [1, 1]]
    ids, mask = join_pairs(batch, pad_token_id=0)
    assert ids.tolist() == [[1, 2, 3, 4], [6, 7, 0, 0], [1, 2, 5, 0], [6, 8, 9, 0]]
    assert mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
