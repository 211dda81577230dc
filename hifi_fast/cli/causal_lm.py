"""``finetune --task causal-lm`` and ``generate``: HiFi on a decoder (Llama, Mistral, Qwen2/3, GPT-2)
trained on next-token prediction, and prompts continued by the result."""
from __future__ import annotations

import json
import time
from pathlib import Path

from .console import CLIError, Console, quiet_transformers
from .loading import auto_threads, load_tokenizer, resolve_device, resolve_model_path
from .methods import save_method, setup_method
from .parse import DEFAULT_LR, check_args
from .runs import METRICS, RUN_CONFIG, default_output_dir, dir_size_mb, record_start, run_config_of, write_json


def load_causal_lm(path: str):
    """``AutoModelForCausalLM`` from a local directory, in float32, eval mode."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load a causal language model from {path}: {err}") from None
    return model.float().eval()


def _split(texts: list[str], prompts: list[str] | None, fraction: float, seed: int) -> tuple:
    """``(texts, prompts, held-out texts, held-out prompts)``: ``split_texts`` applied to both."""
    from hifi_fast.cli.lm_data import split_texts

    kept, held = split_texts(len(texts), fraction, seed)
    pick = lambda rows, idx: None if rows is None else [rows[i] for i in idx]  # noqa: E731
    return pick(texts, kept), pick(prompts, kept), pick(texts, held), pick(prompts, held)


def _texts(args):
    """``(train, eval)`` Encoded-ready ``(texts, prompts)`` pairs and a description."""
    from hifi_fast.cli.lm_data import read_text_file

    if args.train is None:
        raise CLIError("--task causal-lm needs --train FILE (CSV with a header row, or JSONL) with a "
                       f"'{args.text_column or 'text'}' column")
    column = args.text_column or "text"
    texts, prompts = read_text_file(args.train, column, args.prompt_column)
    if args.eval is not None:
        eval_texts, eval_prompts = read_text_file(args.eval, column, args.prompt_column)
        described = f"{args.train} / {args.eval}"
    else:
        texts, prompts, eval_texts, eval_prompts = _split(texts, prompts, args.eval_fraction, args.seed)
        described = f"{args.train} (held out: {args.eval_fraction:g}, seed {args.seed})"
    if getattr(args, "validation", False):  # the evaluation texts stay unread: tune on a part of training's
        texts, prompts, eval_texts, eval_prompts = _split(texts, prompts, args.eval_fraction, args.seed)
        described += f"; evaluating on a {args.eval_fraction:.0%} validation split of the training part"
    cap = lambda rows, n: rows if rows is None or not n else rows[:n]  # noqa: E731
    train = (cap(texts, args.max_train_examples), cap(prompts, args.max_train_examples))
    evaluation = (cap(eval_texts, args.max_eval_examples), cap(eval_prompts, args.max_eval_examples))
    return train, evaluation, described + (f", prompts from '{args.prompt_column}'" if args.prompt_column else "")


def run_finetune_causal_lm(args) -> dict:
    """Score the heads on training text, train their slices on next-token prediction, report the eval
    loss and perplexity before and after, and save the run."""
    import torch

    from hifi_fast.cli.lm_data import encode_lm
    from hifi_fast.cli.train import evaluate_causal_lm, process_peak_rss_mb, set_seed, train_model

    args.resume = getattr(args, "resume", None)
    if args.method != "hifi":
        raise CLIError(f"--task causal-lm trains with --method hifi; got --method {args.method}")
    check_args(args)
    console, progress = Console(args.quiet), not args.quiet
    quiet_transformers(args.quiet)
    threads, why = (args.threads, "--threads") if args.threads else auto_threads()
    torch.set_num_threads(threads)
    job_start = time.perf_counter()
    if args.model is None:
        raise CLIError("--task causal-lm needs --model DIR, a local decoder (Llama, Mistral, Qwen2/3 or GPT-2)")
    model_path = resolve_model_path(args.model)
    device = resolve_device(args.device)
    (train_texts, train_prompts), (eval_texts, eval_prompts), described = _texts(args)
    console.info(f"data: {described}; {len(train_texts)} train / {len(eval_texts)} eval texts")
    console.info(f"model: {model_path}  ({device}, {threads} CPU thread(s): {why})")
    tokenizer = load_tokenizer(model_path)
    set_seed(args.seed)
    model = load_causal_lm(model_path).to(device)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    run_dir = Path(args.output_dir or default_output_dir("hifi-lm"))
    run_dir.mkdir(parents=True, exist_ok=True)
    train_data = encode_lm(tokenizer, train_texts, train_prompts, args.max_length)
    eval_data = encode_lm(tokenizer, eval_texts, eval_prompts, args.max_length)
    batch = max(args.batch_size, 16)
    before = evaluate_causal_lm(model, eval_data, batch, progress)

    lr = args.lr if args.lr is not None else DEFAULT_LR["hifi"]
    info = setup_method(model, "hifi", args, train_data, console, progress)
    selection = info["selection"]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for n, p in model.named_parameters() if "hifi_" not in n)
    console.info(f"selected heads (layer: heads): {selection.heads}; trainable params {trainable:,} of {total:,}")
    record_start(run_dir, run_config_of(args, "hifi", model_path, lr, info, described, None), selection)
    set_seed(args.seed)
    result = train_model(
        model, train_data, epochs=args.epochs, lr=lr, batch_size=args.batch_size,
        warmup_ratio=args.warmup_ratio, weight_decay=args.weight_decay, seed=args.seed,
        max_consecutive_skips=args.max_consecutive_skips, state_dir=run_dir, save_every=args.save_every,
        resume=bool(args.resume), progress=progress, desc="training (hifi, causal-lm)",
    )
    after = evaluate_causal_lm(model, eval_data, batch, progress)
    files = [] if args.no_save else save_method(model, "hifi", run_dir, tokenizer)
    out = {
        "task": "causal-lm", "method": "hifi",
        "eval_loss_before": before["loss"], "perplexity_before": before["perplexity"],
        "eval_loss": after["loss"], "perplexity": after["perplexity"], "eval_tokens": after["tokens"],
        "trainable_params": trainable, "total_params": total, "trainable_percent": 100 * trainable / total,
        "train_time_s": result.train_time_s, "scoring_time_s": info.get("scoring_time_s", 0.0),
        "tokens_per_s": result.tokens_per_s, "steps": result.steps, "skipped_steps": result.skipped_steps,
        "epochs": result.epochs, "lr": lr, "final_train_loss": result.final_loss,
        "epoch_losses": result.epoch_losses, "peak_memory_mb": result.peak_memory_mb,
        "process_peak_rss_mb": process_peak_rss_mb(), "checkpoint_mb": dir_size_mb(files),
        "checkpoint_files": [p.name for p in files], "threads": threads, "device": str(device),
        "num_train": len(train_texts), "num_eval": len(eval_texts),
        "selected_heads": {str(k): v for k, v in selection.heads.items()},
        "total_time_s": time.perf_counter() - job_start, "output_dir": str(run_dir),
    }
    write_json(run_dir / METRICS, out)
    line = (f"causal-lm: eval loss {before['loss']:.4f} -> {after['loss']:.4f}, perplexity "
            f"{before['perplexity']:.2f} -> {after['perplexity']:.2f}; {trainable:,} trainable params; {run_dir}")
    if args.quiet:
        print(line)
    else:
        console.info("\n" + line)
    return out


def load_lm_run(checkpoint: str, model_path: str | None = None):
    """``(model, tokenizer)`` of a ``finetune --task causal-lm`` run: the base decoder with the run's
    slices written into its weights (``unpatch``: a plain model, the base model's inference cost)."""
    import hifi_fast
    from hifi_fast.storing.checkpoint import CONFIG_NAME, read_config

    run_dir = Path(checkpoint)
    if not (run_dir / CONFIG_NAME).is_file():
        raise CLIError(f"--checkpoint {run_dir}: no {CONFIG_NAME} (not a hifi-fast run, or saved with --no-save)")
    run_config = json.loads((run_dir / RUN_CONFIG).read_text()) if (run_dir / RUN_CONFIG).is_file() else {}
    if run_config.get("task", "causal-lm") != "causal-lm":
        raise CLIError(f"--checkpoint {run_dir}: a {run_config['task']} run; generate needs a causal-lm run "
                       "(use hifi-fast predict for classifiers)")
    base = model_path or read_config(run_dir).get("base_model_name_or_path")
    if not base or not Path(base).exists():
        raise CLIError(f"--checkpoint {run_dir}: the base model {base!r} is not there; pass --model DIR")
    tokenizer = load_tokenizer(base)
    model = load_causal_lm(base)
    hifi_fast.load(model, run_dir, check_name=model_path is None)
    return hifi_fast.unpatch(model), tokenizer


def run_generate(args) -> list[str]:
    """Print the continuation of each ``--prompt``; returns them."""
    import torch

    quiet_transformers(True)
    if args.max_new_tokens < 1:
        raise CLIError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    model, tokenizer = load_lm_run(args.checkpoint, args.model)
    model = model.to(resolve_device(args.device))
    tokenizer.padding_side = "left"  # generation continues the last token of every row
    torch.manual_seed(args.seed)
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True).to(model.device)
    sampling = {"do_sample": True, "temperature": args.temperature} if args.sample else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=args.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             **sampling)
    texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    for prompt, text in zip(args.prompt, texts):
        print(f"{prompt}{text}")
    return texts
