"""Fine-tune the attention heads of any local decoder checkpoint (Llama, Mistral, Qwen2/3, GPT-2) on
a text file with HiFi, under the Hugging Face `Trainer`, then generate.

    python examples/causal_lm.py MODEL_DIR TEXTS.txt [--heads-per-layer 2] [--score pagerank] [--steps 200] [--out run/]

TEXTS.txt holds one training text per line. The same job from the command line, with prompt masking
and eval perplexity: ``hifi-fast finetune --task causal-lm --model MODEL_DIR --train data.jsonl``.
"""
import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

import hifi_fast  # noqa: E402
from hifi_fast.config import DEFAULT_HEADS_PER_LAYER, DEFAULT_SCORE, SCORES  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("texts")
    parser.add_argument("--heads-per-layer", type=int, default=DEFAULT_HEADS_PER_LAYER)
    parser.add_argument("--score", default=DEFAULT_SCORE, choices=SCORES,
                        help=f"how heads are chosen (default: {DEFAULT_SCORE}, no scoring pass)")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--out", default="runs/causal-lm-example")
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    with open(args.texts, encoding="utf-8") as handle:
        texts = [line.strip() for line in handle if line.strip()]
    examples = [{"input_ids": ids} for ids in tokenizer(texts, truncation=True, max_length=args.max_length)["input_ids"]]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)

    # Select and patch: random heads need no data; a score (e.g. pagerank) reads up to 256 texts
    # (padding ignored; the task-aware scores predict the text itself).
    scoring = (collator(examples[i:i + 16]) for i in range(0, len(examples), 16))
    config = hifi_fast.HiFiConfig(heads_per_layer=args.heads_per_layer, score=args.score)
    hifi_fast.patch(model, config, batches=scoring)
    hifi_fast.print_trainable_parameters(model)

    training = TrainingArguments(output_dir=args.out, max_steps=args.steps, learning_rate=args.lr,
                                 per_device_train_batch_size=8, gradient_checkpointing=True, report_to=[],
                                 save_strategy="no", logging_steps=20)
    Trainer(model=model, args=training, train_dataset=examples, data_collator=collator).train()
    hifi_fast.save(model, args.out)  # the selected heads' slices only: a few MB

    model = hifi_fast.unpatch(model).eval()  # a plain model: the base model's inference cost
    prompt = tokenizer(texts[0][: len(texts[0]) // 2], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print(tokenizer.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
