"""HiFi on decoder language models (``AutoModelForCausalLM``): Llama, Mistral, Qwen2, Qwen3 (all with
grouped-query attention) and GPT-2 (fused ``c_attn``), on tiny random configs built in code.

Scoring reads plain text batches (labels ignored, padding on either side excluded); training on a
learnable toy corpus lowers the loss and changes only the selected heads' slices; ``generate`` works
patched and after ``unpatch`` (identical, with and without the KV cache); save/load round trip; HF
``Trainer`` with ``DataCollatorForLanguageModeling``, gradient checkpointing and bf16 autocast; TRL's
``SFTTrainer``; and the command line (``finetune --task causal-lm``, ``generate``).
"""
import json

import pytest
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import hifi_fast
from hifi_fast import cli
from hifi_fast.cli.data import IGNORE_INDEX
from hifi_fast.cli.lm_data import encode_lm

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["[PAD]", "[UNK]", "<s>", "</s>"]
VOCAB = len(SPECIAL) + len(WORDS)
DECODER = dict(vocab_size=VOCAB, hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
               intermediate_size=64, max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)
FAMILIES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**DECODER)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**DECODER)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**DECODER)),
    "qwen3": lambda: Qwen3ForCausalLM(Qwen3Config(**DECODER, head_dim=8)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=6, n_positions=64,
                                               pad_token_id=0, bos_token_id=2, eos_token_id=3)),
}
SELECTION = {0: [1], 1: [4]}


def decoder(family: str, seed: int = 0):
    torch.manual_seed(seed)
    return FAMILIES[family]().eval()


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>")


def counting(n: int, length: int = 12, seed: int = 0) -> torch.Tensor:
    """Learnable toy text: each row counts up (mod 40) from a random word."""
    start = torch.randint(0, len(WORDS), (n, 1), generator=torch.Generator().manual_seed(seed))
    return len(SPECIAL) + (start + torch.arange(length)) % len(WORDS)


def _padded(family_ids: torch.Tensor, side: str, pad_id: int = 0):
    ids, mask = family_ids.clone(), torch.ones_like(family_ids)
    cut = slice(0, 4) if side == "left" else slice(-4, None)
    ids[0, cut], mask[0, cut] = pad_id, 0
    return ids, mask


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_scoring_reads_text_batches_and_excludes_padding_on_either_side(family, side):
    model = decoder(family)
    ids, mask = _padded(counting(4), side)
    scores = hifi_fast.score_heads(model, [{"input_ids": ids, "attention_mask": mask}], num_examples=4)
    assert scores.richness.shape == (2, 6) and torch.isfinite(scores.pagerank).all()
    other_pads, _ = _padded(counting(4), side, pad_id=VOCAB - 1)  # padded positions hold another token
    with_labels = {"input_ids": other_pads, "attention_mask": mask, "labels": other_pads}
    again = hifi_fast.score_heads(model, [with_labels], num_examples=4)
    torch.testing.assert_close(again.richness, scores.richness, rtol=1e-9, atol=0)
    torch.testing.assert_close(again.correlation, scores.correlation, rtol=1e-6, atol=1e-7)


def _train(model, steps: int = 30, lr: float = 1e-2) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        ids = counting(8, seed=step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def _changed_rows_and_cols(before: dict, after: dict) -> dict[str, set]:
    """Per changed tensor: the output rows (and input columns) where it differs."""
    changed = {}
    for name, old in before.items():
        diff = after[name] != old
        if diff.any():
            rows = set(diff.reshape(diff.shape[0], -1).any(1).nonzero().flatten().tolist())
            cols = set(diff.any(0).nonzero().flatten().tolist()) if diff.dim() == 2 else set()
            changed[name] = (rows, cols)
    return changed


@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_the_loss_and_changes_only_the_selected_slices(family):
    model = hifi_fast.patch(decoder(family), hifi_fast.HeadSelection(SELECTION))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses = _train(model)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses  # nats, from ln(44) = 3.78 at random
    changed = _changed_rows_and_cols(before, model.state_dict())
    d, slices = 8, hifi_fast.tuning.patching.plan_slices(model, hifi_fast.HeadSelection(SELECTION))
    allowed = {}
    for spec in slices:
        features = {b + i for b in spec.blocks for i in range(d)}
        allowed.setdefault(spec.module_name, []).append((spec.sliced, features))
    assert changed
    for name, (rows, cols) in changed.items():
        module = name.rsplit(".", 1)[0]
        assert module in allowed, name  # embeddings, MLPs, norms and the LM head stay frozen
        for sliced, features in allowed[module]:
            conv1d = family == "gpt2"  # Conv1D weights are [in, out]
            out_features = cols if conv1d and name.endswith("weight") else rows
            in_features = rows if conv1d else cols
            touched = out_features if sliced == "rows" else in_features
            assert touched <= features, (name, sorted(touched - features))


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_patched_equals_unpatched_with_and_without_cache(family):
    model = hifi_fast.patch(decoder(family), hifi_fast.HeadSelection(SELECTION))
    _train(model, steps=5)
    prompt = counting(2, length=5, seed=99)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    model.eval()
    with torch.no_grad():
        cached = model.generate(prompt, **kwargs)
        uncached = model.generate(prompt, use_cache=False, **kwargs)
        plain = hifi_fast.unpatch(model).generate(prompt, **kwargs)
    assert torch.equal(cached, uncached) and torch.equal(cached, plain)
    assert cached.shape == (2, 11)


@pytest.mark.parametrize("family", FAMILIES)
def test_save_load_round_trip(family, tmp_path):
    model = hifi_fast.patch(decoder(family), hifi_fast.HeadSelection(SELECTION))
    _train(model, steps=3)
    hifi_fast.save(model, tmp_path)
    loaded = hifi_fast.load(decoder(family), tmp_path).eval()
    ids = counting(3, seed=7)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).logits, loaded(input_ids=ids).logits)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_trained_tied_lm_head_saves_loads_and_swaps(family, tmp_path):
    """A tied LM head is one tensor with its embedding: ``named_parameters`` lists it once, under the
    embedding's name, and checkpoint, load and swap name it so too."""
    make = (lambda: decoder(family)) if family == "gpt2" else (
        lambda: LlamaForCausalLM(LlamaConfig(**DECODER, tie_word_embeddings=True)).eval())
    torch.manual_seed(0)
    model = hifi_fast.patch(make(), hifi_fast.HeadSelection(SELECTION), modules_to_save=["lm_head"])
    assert model.lm_head.weight is model.get_input_embeddings().weight and model.lm_head.weight.requires_grad
    _train(model, steps=3)
    hifi_fast.save(model, tmp_path)
    ids = counting(3, seed=7)
    torch.manual_seed(0)
    loaded = hifi_fast.load(make(), tmp_path).eval()
    torch.manual_seed(0)
    swapped = hifi_fast.swap(make(), tmp_path).eval()
    with torch.no_grad():
        want = model.eval()(input_ids=ids).logits
        assert torch.equal(loaded(input_ids=ids).logits, want) and torch.equal(swapped(input_ids=ids).logits, want)


def test_scoring_passes_a_batchs_position_ids_on():
    """GPT-2's positions are absolute: a left-padded batch scores as the unpadded one only with its
    ``position_ids`` (as generation derives them from the mask)."""
    model = decoder("gpt2")
    ids = counting(2)
    plain = hifi_fast.score_heads(model, [{"input_ids": ids}])
    padded = torch.cat([torch.zeros(2, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(2, 3, dtype=torch.long), torch.ones_like(ids)], 1)
    shifted = hifi_fast.score_heads(model, [{"input_ids": padded, "attention_mask": mask}])
    assert not torch.allclose(shifted.richness, plain.richness, rtol=1e-4, atol=0)
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    given = hifi_fast.score_heads(model, [{"input_ids": padded, "attention_mask": mask, "position_ids": positions}])
    torch.testing.assert_close(given.richness, plain.richness, rtol=1e-7, atol=1e-9)


def _lm_dataset(n: int = 32):
    return [{"input_ids": row.tolist()} for row in counting(n, seed=3)]


def test_hf_trainer_with_lm_collator_gradient_checkpointing_and_bf16(tmp_path):
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    model = hifi_fast.patch(decoder("llama"), hifi_fast.HeadSelection(SELECTION))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12, learning_rate=1e-2,
                             gradient_checkpointing=True, bf16=True, use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=1, seed=0)
    collator = DataCollatorForLanguageModeling(tokenizer(), mlm=False)
    trainer = Trainer(model=model, args=args, train_dataset=_lm_dataset(), data_collator=collator)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert losses[-1] < losses[0], losses
    changed = {name.rsplit(".", 1)[0] for name in _changed_rows_and_cols(before, model.state_dict())}
    assert changed and changed <= {s.module_name for s in hifi_fast.tuning.patching.plan_slices(model, model.hifi_state.selection)}
    with torch.no_grad():
        assert model.eval().generate(counting(1, length=4), max_new_tokens=3, do_sample=False, pad_token_id=0).shape == (1, 7)


def test_trl_sft_trainer(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tok = tokenizer()
    texts = [" ".join(WORDS[int(i) - len(SPECIAL)] for i in row) for row in counting(32, seed=5)]
    model = hifi_fast.patch(decoder("qwen2"), hifi_fast.HeadSelection(SELECTION))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = trl.SFTConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=6, learning_rate=1e-2,
                           use_cpu=True, report_to=[], save_strategy="no", logging_steps=1, max_length=32)
    trainer = trl.SFTTrainer(model=model, args=config, train_dataset=datasets.Dataset.from_dict({"text": texts}),
                             processing_class=tok)
    trainer.train()
    changed = {name.rsplit(".", 1)[0] for name in _changed_rows_and_cols(before, model.state_dict())}
    assert changed and changed <= {s.module_name for s in hifi_fast.tuning.patching.plan_slices(model, model.hifi_state.selection)}


def test_a_prompt_that_fills_max_length_is_refused():
    """Its example would keep no target: a NaN loss, skipped as non-finite without saying why."""
    from hifi_fast.cli.data import DataError

    texts, prompts = ["w1 w2", "w3 w4"], ["w5 w6 w7", " ".join(WORDS[:10])]
    assert encode_lm(tokenizer(), texts, prompts, max_length=12).token_labels[1][-1] != IGNORE_INDEX
    with pytest.raises(DataError, match=r"1 of 2 examples \(rows \[1\] .*keep no response token within --max-length 8"):
        encode_lm(tokenizer(), texts, prompts, max_length=8)


def test_validation_evaluates_on_a_part_of_the_training_texts(tmp_path):
    """``--validation`` (to tune without touching the evaluation texts) is honoured for causal LMs too."""
    from types import SimpleNamespace

    from hifi_fast.cli.causal_lm import _texts

    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps({"text": f"w{i} w{i + 1}"}) for i in range(20)))
    evaluation = tmp_path / "eval.jsonl"
    evaluation.write_text("\n".join(json.dumps({"text": f"w{i} w{i}"}) for i in range(30, 35)))
    args = SimpleNamespace(train=train, eval=evaluation, text_column=None, prompt_column=None, eval_fraction=0.25,
                           seed=0, max_train_examples=0, max_eval_examples=0, validation=False)
    (train_texts, _), (eval_texts, _), _ = _texts(args)
    assert len(train_texts) == 20 and eval_texts == [f"w{i} w{i}" for i in range(30, 35)]
    args.validation = True
    (train_texts, _), (eval_texts, _), described = _texts(args)
    assert len(train_texts) == 15 and len(eval_texts) == 5 and "validation split" in described
    assert not set(eval_texts) & set(train_texts) and set(eval_texts) < {f"w{i} w{i + 1}" for i in range(20)}


def test_prompt_takes_no_loss_and_padding_neither():
    tok = tokenizer()
    data = encode_lm(tok, ["w3 w4 w5", "w9"], ["w1 w2", "w7 w8"], max_length=16)
    assert data.input_ids[0][:2] == tok("w1 w2")["input_ids"]
    assert data.token_labels[0] == [IGNORE_INDEX, IGNORE_INDEX] + tok("w3 w4 w5")["input_ids"] + [tok.eos_token_id]
    from hifi_fast.cli.data import collate

    batch = collate(data, [0, 1])
    assert batch["labels"][1].tolist() == [IGNORE_INDEX] * 2 + tok("w9")["input_ids"] + [tok.eos_token_id] + [IGNORE_INDEX] * 2


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer().save_pretrained(path)
    decoder("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lm_jsonl(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm-data") / "train.jsonl"
    rows = counting(120, length=10, seed=11)
    lines = []
    for row in rows:
        words = [WORDS[int(i) - len(SPECIAL)] for i in row]
        lines.append(json.dumps({"prompt": " ".join(words[:3]), "text": " ".join(words[3:])}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_cli_finetune_causal_lm_then_generate(lm_dir, lm_jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--task", "causal-lm", "--model", str(lm_dir), "--train", str(lm_jsonl), "--prompt-column",
            "prompt", "--output-dir", str(out), "--epochs", "3", "--batch-size", "8", "--lr", "1e-2",
            "--scoring-examples", "16", "--heads-per-layer", "1", "--threads", "1", "--quiet"]
    assert cli.main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["eval_loss_before"] and metrics["perplexity"] < metrics["perplexity_before"]
    assert json.loads((out / "run_config.json").read_text())["task"] == "causal-lm"
    capsys.readouterr()
    assert cli.main(["generate", "--checkpoint", str(out), "--prompt", "w1 w2 w3", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed.startswith("w1 w2 w3") and len(printed.split()) >= 4
    model, tok = cli.causal_lm.load_lm_run(str(out))
    assert not hifi_fast.is_patched(model)


def test_cli_causal_lm_refuses_what_it_cannot_do(lm_dir, lm_jsonl, tmp_path, capsys):
    base = ["finetune", "--task", "causal-lm", "--output-dir", str(tmp_path / "r"), "--quiet"]
    assert cli.main(base + ["--train", str(lm_jsonl)]) == 2
    assert "--task causal-lm needs --model DIR" in capsys.readouterr().err
    assert cli.main(base + ["--model", str(lm_dir)]) == 2
    assert "--task causal-lm needs --train FILE" in capsys.readouterr().err
    assert cli.main(base + ["--model", str(lm_dir), "--train", str(lm_jsonl), "--method", "lora"]) == 2
    assert "--task causal-lm trains with --method hifi" in capsys.readouterr().err
