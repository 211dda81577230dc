"""``finetune`` and ``predict`` for sequence classification."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .console import CLIError, Console, quiet_transformers
from .loading import auto_threads, load_classifier, load_tokenizer, model_label, resolve_device, resolve_model_path
from .methods import save_method, setup_method
from .parse import DEFAULT_LR, check_args, check_sizes
from .report import print_summary
from .runs import METRICS, default_output_dir, dir_size_mb, load_run, record_start, run_config_of, write_json


def load_splits(args):
    from hifi_fast.cli.data import load_data

    return load_data(
        train_path=args.train, eval_path=args.eval, text_column=args.text_column,
        label_column=args.label_column, eval_fraction=args.eval_fraction,
        max_train_examples=args.max_train_examples or None, max_eval_examples=args.max_eval_examples or None,
        seed=args.seed, validation=args.validation,
    )


def run_finetune(args, method: str | None = None, output_dir: Path | None = None) -> dict:
    """The whole job for one method; returns the metrics written to ``metrics.json``."""
    import torch

    from hifi_fast.cli.data import encode
    from hifi_fast.cli.train import evaluate, process_peak_rss_mb, set_seed, train_model

    args.resume = getattr(args, "resume", None)  # compare's arguments have none
    method = method or args.method
    check_args(args)
    console = Console(args.quiet)
    progress = not args.quiet
    quiet_transformers(args.quiet)
    threads, why = (args.threads, "--threads") if args.threads else auto_threads()
    torch.set_num_threads(threads)
    job_start = time.perf_counter()
    splits = load_splits(args)
    model_path = resolve_model_path(args.model)
    device = resolve_device(args.device)
    console.info(f"data: {splits.description}")
    console.info(f"      {len(splits.train)} train / {len(splits.eval)} eval examples, "
                 f"labels {splits.label_names}")
    console.info(f"model: {model_path}  ({device}" + (f", {threads} CPU thread{'s' if threads > 1 else ''}: {why})"
                                                      if device.type == "cpu" else ")"))
    tokenizer = load_tokenizer(model_path)
    set_seed(args.seed)
    model = load_classifier(model_path, splits.label_names, tokenizer, args.seed).to(device)
    run_dir = Path(output_dir or args.output_dir or default_output_dir(method))
    run_dir.mkdir(parents=True, exist_ok=True)
    total_params = sum(p.numel() for p in model.parameters())
    train_data = encode(tokenizer, splits.train.texts, splits.train.labels, args.max_length)
    eval_data = encode(tokenizer, splits.eval.texts, splits.eval.labels, args.max_length)

    lr = args.lr if args.lr is not None else DEFAULT_LR[method]
    info = setup_method(model, method, args, train_data, console, progress)
    model = info.pop("peft_model", model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    selection = info.get("selection")
    if selection is not None:
        console.info(f"selected heads (layer: heads): {selection.heads}")
    console.info(f"method {method}: trainable params {trainable:,} of {total_params:,} "
                 f"({100 * trainable / total_params:.3f}%), lr {lr:g}, {args.epochs} epoch(s)")

    record_start(run_dir, run_config_of(args, method, model_path, lr, info, splits.description, splits.label_names),
                 selection)

    set_seed(args.seed)
    if args.resume:
        console.info(f"resuming {run_dir} from its last saved step")
    result = train_model(
        model, train_data, epochs=args.epochs, lr=lr, batch_size=args.batch_size,
        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, seed=args.seed,
        max_consecutive_skips=args.max_consecutive_skips, state_dir=run_dir, save_every=args.save_every,
        resume=bool(args.resume), progress=progress, desc=f"training ({method})",
    )
    metrics = evaluate(model, eval_data, len(splits.label_names), splits.label_names,
                       batch_size=max(args.batch_size, 64), progress=progress)

    checkpoint_files: list[Path] = []
    if not args.no_save:
        checkpoint_files = save_method(model, method, run_dir, tokenizer)
    if selection is not None and selection.scores is not None:  # random heads: no scores to draw
        from hifi_fast.cli.plots import plot_heads

        plot_heads(selection.scores, selection.heads, run_dir / "heads.png",
                   title=f"HiFi head scores: {model_label(model_path)}, {selection.num_heads} heads selected")

    out = {
        "method": method,
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
        "majority_accuracy": splits.eval.majority_accuracy(),
        "eval_loss": metrics["loss"],
        "trainable_params": trainable,
        "total_params": total_params,
        "trainable_percent": 100 * trainable / total_params,
        "train_time_s": result.train_time_s,
        "scoring_time_s": info.get("scoring_time_s", 0.0),
        "eval_time_s": metrics["eval_time_s"],
        "tokens_per_s": result.tokens_per_s,
        "steps": result.steps,
        "skipped_steps": result.skipped_steps,
        "epochs": result.epochs,
        "lr": lr,
        "final_train_loss": result.final_loss,
        "epoch_losses": result.epoch_losses,
        "peak_memory_mb": result.peak_memory_mb,
        "process_peak_rss_mb": process_peak_rss_mb(),
        "checkpoint_mb": dir_size_mb(checkpoint_files),
        "checkpoint_files": [p.name for p in checkpoint_files],
        "threads": threads,
        "device": str(device),
        "num_train": len(splits.train),
        "num_eval": len(splits.eval),
        "label_names": splits.label_names,
        "per_class": metrics["per_class"],
        "confusion_matrix": metrics["confusion_matrix"],
        "selected_heads": {str(k): v for k, v in selection.heads.items()} if selection is not None else None,
        "total_time_s": time.perf_counter() - job_start,
        "output_dir": str(run_dir),
    }
    write_json(run_dir / METRICS, out)
    print_summary(out, console, args.quiet)
    return out


def run_predict(args) -> list[dict]:
    import torch

    from hifi_fast.cli.data import encode
    from hifi_fast.cli.train import predict_logits

    quiet_transformers(True)
    check_sizes(args)
    texts = list(args.text)
    if args.input:
        path = Path(args.input)
        if not path.is_file():
            raise CLIError(f"--input {path}: file not found")
        texts += [line.rstrip("\n") for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                  if line.strip()]
    if not texts:
        raise CLIError("predict: give --text \"...\" (repeatable) or --input FILE with one text per line")
    model, tokenizer, run_config = load_run(args.checkpoint, args.model)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    max_length = args.max_length or run_config.get("max_length", 128)
    data = encode(tokenizer, texts, None, max_length)
    probs = torch.softmax(predict_logits(model, data, args.batch_size, progress=not args.quiet and len(texts) > 256),
                          dim=-1)
    results = []
    for text, p in zip(texts, probs.tolist()):
        best = max(range(len(p)), key=p.__getitem__)
        result = {"text": text, "label": names[best], "probabilities": dict(zip(names, p))}
        results.append(result)
        if args.json:
            print(json.dumps(result, ensure_ascii=False))
        else:
            others = ", ".join(f"{n} {q:.3f}" for n, q in zip(names, p))
            shown = text if len(text) <= 80 else text[:77] + "..."
            print(f"{names[best]:<12} {p[best]:.3f}   [{others}]   {shown}")
    return results
