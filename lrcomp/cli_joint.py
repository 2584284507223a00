"""``lrcomp compress --method <joint>``: fine-tune and compress in one run under ``transformers.Trainer``.

The joint methods (``acip``, ``pc_lora``, ``tunecomp``, ``jactus``, ``lpaf``) train while they
compress, so they need a task and a loss:

- ``--task lm`` (default for causal LMs): next-token loss on the ``--data`` texts (domain
  adaptation); the compact model keeps its LM head.
- ``--task classification`` (default for other models): ``AutoModelForSequenceClassification``
  with a new head over the labels of ``--data`` (CSV/JSONL column ``label``, the category of a
  fortune file, a dataset's label column); the head is trained, never compressed.

The run is a :class:`lrcomp.integrations.LowRankTrainer` (the compressor is stepped by its
callback). Everything in flight lives in the work folder ``OUT.lrcomp-work``: the settings of
the run (``run.json``), the calibration statistics (``calib.safetensors``) and the Trainer
checkpoints (``trainer/checkpoint-N`` with the compressor's state). Running the same command
again after a crash or Ctrl-C resumes from the last checkpoint; ``--restart`` discards it. On
success the compact model is written to ``OUT`` (staged, then renamed) and the work folder is
removed.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from lrcomp import cli

RUN_FILE = "run.json"
CALIB_FILE = "calib.safetensors"



def work_dir(out: Path) -> Path:
    """The folder that holds a run in flight for output folder ``out``: ``OUT.lrcomp-work`` beside it."""
    return out.with_name(out.name + ".lrcomp-work")


def parse_method_options(items: list[str] | None) -> dict:
    """``["KEY=VALUE", ...]`` -> dict; VALUE is read as JSON when it parses (numbers, true/false, lists), else kept
    as a string."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise cli.UsageError(f"--method-option {item!r}: expected KEY=VALUE")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value
    return options


def _settings(args: argparse.Namespace, folder: Path, task: str, target, exclude) -> dict:
    return {"model": str(folder.resolve()), "method": args.method, "budget": args.budget, "cost": args.cost,
            "task": task, "data": args.data, "train_samples": args.train_samples, "eval_fraction": args.eval_fraction,
            "seed": args.seed, "max_length": args.max_length, "steps": args.steps, "lr": args.lr,
            "other_lr": args.other_lr, "train_batch_size": args.train_batch_size, "grad_accum": args.grad_accum,
            "calib_samples": args.calib_samples, "batch_size": args.batch_size, "target": target,
            "exclude": exclude, "method_options": parse_method_options(args.method_option), "dtype": args.dtype}


def open_work_dir(work: Path, settings: dict, restart: bool) -> bool:
    """Create ``work`` (or check it holds a run with the same ``settings``); True when it can be resumed."""
    from lrcomp.atomic import write_json

    run_file = work / RUN_FILE
    if work.exists() and restart:
        cli._log(f"--restart: removing the previous run in {work}")
        shutil.rmtree(work)
    if run_file.is_file():
        try:
            before = json.loads(run_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise cli.CLIError(f"{run_file} is not valid JSON ({err}): pass --restart to discard {work}") from err
        changed = [k for k in dict.fromkeys([*before, *settings]) if before.get(k) != settings.get(k)]
        if changed:
            detail = ", ".join(f"{k}: {before.get(k)!r} then, {settings.get(k)!r} now" for k in changed[:4])
            raise cli.UsageError(f"{work} holds an interrupted run with other settings ({detail}): run the same "
                                 f"command to resume it, or pass --restart to discard it")
        return True
    if work.exists() and any(work.iterdir()):
        raise cli.UsageError(f"{work} exists but holds no {RUN_FILE}: remove it or pass --restart")
    work.mkdir(parents=True, exist_ok=True)
    write_json(run_file, settings)
    return False


def _split(n: int, eval_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and held-out texts (a seeded permutation)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = int(round(n * eval_fraction))
    if n - n_eval < 1:
        raise cli.UsageError(f"--eval-fraction {eval_fraction:g} leaves no training text out of {n}")
    return order[n_eval:], order[:n_eval]


class _Texts(torch.utils.data.Dataset):
    """Tokenized examples ``{"input_ids": list[int], "attention_mask": list[int] (, "labels": int)}``."""

    def __init__(self, tokenizer, texts: list[str], labels: list[int] | None, max_length: int) -> None:
        enc = tokenizer(texts, truncation=True, max_length=max_length)
        self.items = [{"input_ids": ids, "attention_mask": mask} for ids, mask in
                      zip(enc["input_ids"], enc["attention_mask"], strict=True)]
        if labels is not None:
            for item, label in zip(self.items, labels, strict=True):
                item["labels"] = label

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def _collator(transformers, tokenizer, task: str):
    if task == "lm":
        return transformers.DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return transformers.DataCollatorWithPadding(tokenizer)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: _Texts, collate, task: str, batch_size: int, device: torch.device) -> dict:
    """Held-out metrics: ``{"accuracy"}`` (classification) or ``{"loss", "perplexity"}`` (lm, token-weighted)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    nll = tokens = 0.0
    for start in range(0, len(dataset), batch_size):
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in range(start, min(start + batch_size,
                                                                                          len(dataset)))]).items()}
        out = model(**batch)
        if task == "classification":
            correct += int((out.logits.argmax(-1) == batch["labels"]).sum())
            total += int(batch["labels"].numel())
        else:
            n = int((batch["labels"][:, 1:] != -100).sum())
            nll += float(out.loss) * n
            tokens += n
    model.train(was_training)
    if task == "classification":
        return {"accuracy": correct / max(total, 1), "texts": total}
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": int(tokens)}


def run(args: argparse.Namespace) -> int:
    """Fine-tune and compress ``args.model`` with the joint method ``args.method``; see the module docstring."""
    import lrcomp
    from lrcomp.data import load_labeled_texts, load_texts
    from lrcomp.integrations.hf import mark_lowrank
    from lrcomp.integrations.trainer import make_trainer
    from lrcomp.replace import find_target_linears

    transformers = cli._transformers()
    from transformers.trainer_utils import get_last_checkpoint

    folder = cli._model_dir(args.model, "MODEL")
    out = cli._check_out_dir(args.out, [folder], args.overwrite)
    device = cli._device(args.device)
    if args.auto_class is not None:
        raise cli.UsageError("--auto-class is for one-shot methods: a joint method loads AutoModelForCausalLM "
                             "(--task lm) or AutoModelForSequenceClassification (--task classification)")
    if args.steps is None:
        raise cli.UsageError(f"--method {args.method} trains while it compresses: give --steps N (optimizer steps)")
    causal = any(cli._is_causal_architecture(a) for a in cli._architectures(folder))
    task = args.task if args.task != "auto" else ("lm" if causal else "classification")
    if task == "lm" and not causal:
        raise cli.UsageError(f"--task lm needs a causal LM; {folder} has architectures "
                             f"{cli._architectures(folder)}")
    target = cli._target_spec(args.target_modules, args.target_regex, "all-linear")
    exclude = cli._target_spec(args.exclude_modules, args.exclude_regex, None)
    options = parse_method_options(args.method_option)

    # --- data: the training texts, a held-out split, the calibration batches
    limit = args.train_samples
    try:
        if task == "classification":
            texts, labels, label_names = load_labeled_texts(args.data, limit=limit, seed=args.seed, min_chars=1,
                                                            max_chars=None)
        else:
            texts, labels, label_names = load_texts(args.data, limit=limit, seed=args.seed, min_chars=1,
                                                    max_chars=None), None, None
    except FileNotFoundError as err:
        raise cli.InputNotFound(f"--data: {cli._one_line(err)}") from err
    except (ValueError, ImportError) as err:
        raise cli.CLIError(f"--data: {cli._one_line(err)}") from err
    if task == "classification" and len(label_names) < 2:
        raise cli.UsageError(f"--data: classification needs at least 2 labels, found {label_names}")
    train_idx, eval_idx = _split(len(texts), args.eval_fraction, args.seed)
    tokenizer = cli._load_tokenizer(folder, pad=True)

    work = work_dir(out)
    resumable = open_work_dir(work, _settings(args, folder, task, target, exclude), args.restart)
    checkpoint = get_last_checkpoint(str(work / "trainer")) if resumable and (work / "trainer").is_dir() else None

    started = time.perf_counter()
    if task == "classification":
        auto_class = transformers.AutoModelForSequenceClassification
        extra = {"num_labels": len(label_names), "id2label": dict(enumerate(label_names)),
                 "label2id": {n: i for i, n in enumerate(label_names)}}
    else:
        auto_class, extra = transformers.AutoModelForCausalLM, {}
    cli._log(f"loading {folder} with {auto_class.__name__}" + (f" ({len(label_names)} labels)" if extra else ""))
    torch_dtype = cli._DTYPES[args.dtype]
    # a new head, LoRA factors, teacher copies: every random init from --seed, so a resumed run matches
    transformers.set_seed(args.seed)
    try:
        model = auto_class.from_pretrained(str(folder), local_files_only=True, dtype=torch_dtype, **extra)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise cli.CLIError(f"could not load {str(folder)!r} with {auto_class.__name__}: {cli._one_line(err)}") from err
    if cli._lowrank_layers(model):
        raise cli.UsageError(f"MODEL {args.model!r} is already an lrcomp low-rank checkpoint: start from the dense "
                             f"model it came from")
    if task == "lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    try:
        targets = find_target_linears(model, target, exclude, required=True)
    except ValueError as err:
        raise cli.UsageError(f"--target-modules / --exclude-modules: {cli._one_line(err)}") from err
    dense_w = sum(model.get_submodule(n).weight.numel() for n in targets)

    calib_texts = [texts[i] for i in train_idx[:args.calib_samples]]
    calib = cli._calibration_batches(tokenizer, calib_texts, args.batch_size, args.max_length, causal=task == "lm")
    if task == "classification":
        for batch, start in zip(calib, range(0, len(calib_texts), args.batch_size), strict=True):
            rows = train_idx[start:start + args.batch_size]
            batch["labels"] = torch.tensor([labels[i] for i in rows])
    calib = [{k: v.to(device) for k, v in b.items()} for b in calib]
    try:
        config = lrcomp.CompressionConfig(
            method=args.method, budget=args.budget, cost=args.cost, target_modules=target, exclude_modules=exclude,
            min_rank=args.min_rank, total_steps=args.steps, method_options=options, other_lr=args.other_lr,
            calib_save_path=str(work / CALIB_FILE))
        cli._log(f"{len(targets)} target layers; calibrating on {len(calib_texts)} texts")
        comp = lrcomp.Compressor(model, config, calib_data=calib, loss_fn=lambda outputs, batch: outputs.loss)
    except (ValueError, TypeError) as err:
        raise cli.UsageError(cli._one_line(err)) from err

    def subset(idx):
        return _Texts(tokenizer, [texts[i] for i in idx], None if labels is None else [labels[i] for i in idx],
                      args.max_length)

    train_set, eval_set = subset(train_idx), subset(eval_idx)
    collate = _collator(transformers, tokenizer, task)
    training_args = transformers.TrainingArguments(
        output_dir=str(work / "trainer"), max_steps=args.steps, learning_rate=args.lr,
        per_device_train_batch_size=args.train_batch_size, gradient_accumulation_steps=args.grad_accum,
        lr_scheduler_type="linear", warmup_steps=max(1, args.steps // 10), weight_decay=0.01,
        save_strategy="steps", save_steps=args.save_steps, save_total_limit=2, logging_steps=max(1, args.steps // 20),
        report_to=[], seed=args.seed, data_seed=args.seed, use_cpu=device.type == "cpu",
        dataloader_num_workers=0, disable_tqdm=False, remove_unused_columns=False)
    trainer = make_trainer(model, comp, training_args, train_set, data_collator=collate, processing_class=tokenizer)
    if checkpoint is not None:
        cli._log(f"resuming the interrupted run from {checkpoint}")
    cli._log(f"{args.method} to budget {args.budget:g}: {args.steps} steps on {len(train_set)} texts "
             f"(work folder {work}; rerun the same command to resume if interrupted)")
    result = trainer.train(resume_from_checkpoint=checkpoint)
    final = trainer.model.to(device)

    metrics = evaluate(final, eval_set, collate, task, args.train_batch_size, device) if len(eval_set) else {}
    lowrank = cli._lowrank_layers(final)
    kept_w = sum(m.num_parameters(compact=True) - (m.out_features if m.bias is not None else 0)
                 for m in lowrank.values())
    kept_w += sum(final.get_submodule(n).weight.numel() for n in targets if n not in lowrank)
    ranks = {n: m.active_rank for n, m in lowrank.items()}
    line = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
    print(f"{type(final).__name__} from {folder}: {args.method} ({task}), {args.steps} steps, targeted weights "
          f"{dense_w:,} -> {kept_w:,} ({kept_w / dense_w:.4f}, budget {args.budget:g})"
          + (f"; held-out {line}" if line else ""))
    lrcomp.summary(final)
    report = {
        "lrcomp_version": lrcomp.__version__, "source_model": str(folder.resolve()), "task": task,
        "architecture": type(final).__name__, "auto_class": auto_class.__name__, "method": args.method,
        "method_options": options, "budget": args.budget, "cost": args.cost, "steps": args.steps, "lr": args.lr,
        "other_lr": args.other_lr, "train_texts": len(train_set), "eval_texts": len(eval_set), "labels": label_names,
        "train_loss": float(result.training_loss), "eval": metrics, "resumed_from": checkpoint,
        "params": {"targeted_weights_before": dense_w, "targeted_weights_after": kept_w,
                   "targeted_weights_kept_fraction": kept_w / dense_w},
        "ranks": ranks, "kept_dense": [n for n in targets if n not in lowrank], "device": str(device),
        "wall_s": None,
    }
    with cli._staged_dir(out) as tmp:
        if ranks:
            mark_lowrank(final)
        final.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        report["wall_s"] = round(time.perf_counter() - started, 3)
        cli._write_json(tmp / cli.REPORT_NAME, report)
    shutil.rmtree(work, ignore_errors=True)
    print(f"saved to {out} (load it with transformers' {auto_class.__name__}.from_pretrained after `import lrcomp`; "
          f"report: {out / cli.REPORT_NAME})")
    return cli.EXIT_OK

