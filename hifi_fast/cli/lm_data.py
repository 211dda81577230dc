"""Text for causal language modelling: reading a file of texts (optionally with prompts), splitting
it, and tokenizing it with per-token targets (the prompt and the padding take no loss)."""
from __future__ import annotations

import os
import random
from collections.abc import Sequence

from .data import IGNORE_INDEX, DataError, Encoded, read_labelled_file


def read_text_file(path: str | os.PathLike, text_column: str = "text",
                   prompt_column: str | None = None) -> tuple[list[str], list[str] | None]:
    """``(texts, prompts or None)`` of a ``.csv`` or ``.jsonl`` file; with ``prompt_column`` each text
    is the response that follows its prompt. Bad rows raise ``DataError`` with their line numbers."""
    # The labelled-file reader checks both columns row by row; without prompts the text is read twice.
    texts, second = read_labelled_file(path, text_column, prompt_column or text_column)
    return texts, (second if prompt_column else None)


def split_texts(count: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded random ``(train, eval)`` indices; at least one example on each side."""
    if count < 2:
        raise DataError(f"need at least 2 texts to split into training and evaluation, got {count}")
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = min(count - 1, max(1, round(eval_fraction * count)))
    return sorted(order[held:]), sorted(order[:held])


def encode_lm(tokenizer, texts: Sequence[str], prompts: Sequence[str] | None, max_length: int) -> Encoded:
    """Token ids of ``prompt + text + eos`` (truncated to ``max_length``) with targets equal to the
    ids, except ``IGNORE_INDEX`` on the prompt (the model learns the response, not the prompt)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    bodies = tokenizer(list(texts), add_special_tokens=prompts is None)["input_ids"]
    heads = tokenizer(list(prompts))["input_ids"] if prompts is not None else [[] for _ in bodies]
    ids, targets, no_target = [], [], []
    for row, (head, body) in enumerate(zip(heads, bodies)):
        seq = (head + body + eos)[:max_length]
        ids.append(seq)
        targets.append(([IGNORE_INDEX] * len(head) + body + eos)[:max_length])
        if all(t == IGNORE_INDEX for t in targets[-1]):
            no_target.append(row)
    if no_target:  # their loss would be 0/0: NaN steps, skipped as non-finite without saying why
        raise DataError(
            f"{len(no_target)} of {len(ids)} examples (rows {no_target[:5]}{' ...' if len(no_target) > 5 else ''} "
            f"after splitting) keep no response token within --max-length {max_length}: their prompt fills it; "
            "raise --max-length or shorten the prompts")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    return Encoded(ids, None, None, int(pad), token_labels=targets)
