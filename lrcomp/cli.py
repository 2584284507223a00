"""The ``lrcomp`` command line: compress, export, evaluate, benchmark, serve and plot, without writing Python.

Subcommands (``lrcomp COMMAND --help`` for each one's options)::

    lrcomp compress MODEL --out DIR      low-rank compression of a local Hugging Face model folder: one-shot,
                                         or a joint method that fine-tunes while it compresses (--steps N)
    lrcomp export DIR --out DIR2         re-save an lrcomp checkpoint as an ordinary dense one (or as is)
    lrcomp eval DIR [--ppl FILE] [--compare REF] [--tasks T1,T2]
                                         perplexity, embedding cosine to a reference, lm-eval tasks
    lrcomp bench DIR --reference REF     parameters and median forward time against a reference model
    lrcomp serve DIR                     an OpenAI-compatible server (transformers' serving engine):
                                         completions for causal LMs, embeddings for encoders
    lrcomp report RESULTS_JSON --out PNG accuracy vs kept parameters from a benchmarks/results/quality*.json

Exit codes: 0 success; 1 runtime failure (one line ``lrcomp: error: ...`` on stderr, the traceback only with
``--debug``); 2 usage error (argparse's own, and bad option values found after loading, e.g. ``--window``
longer than the model's positions); 3 an input that does not exist (model folder, data or text file,
results file). ``python -m lrcomp`` is the same command.

Everything runs offline: models load with ``local_files_only=True``. ``--device auto`` means CUDA when
available, else the CPU. Progress bars (tqdm) and status lines go to stderr, results to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from lrcomp.compression.config import JOINT_METHODS, ONE_SHOT_METHODS

PROG = "lrcomp"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_NOT_FOUND = 0, 1, 2, 3
REPORT_NAME = "lrcomp_report.json"
# Methods whose required statistics need a loss (gradients): a causal LM gives one from its calibration text.
_GRADIENT_METHODS = ("fwsvd",)
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

EXIT_CODES_HELP = """exit codes:
  0  success
  1  runtime failure: one line "lrcomp: error: ..." on stderr (the traceback with --debug)
  2  usage error: a missing or bad argument (the message names it)
  3  an input does not exist: model folder, data file, text file, results file"""


# ---------------------------------------------------------------------------------------------- errors
class CLIError(Exception):
    """A failure reported as one line ``lrcomp: error: <message>``; ``code`` is the exit status."""

    code = EXIT_FAILURE


class InputNotFound(CLIError):
    """A named input (model folder, file) does not exist: exit 3."""

    code = EXIT_NOT_FOUND


class UsageError(CLIError):
    """A bad option value found after parsing (it depends on the model or the files): exit 2."""

    code = EXIT_USAGE


def _log(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# ---------------------------------------------------------------------------------------------- argument types
def _budget(text: str) -> float:
    return _float_in(text, lambda v: 0.0 < v <= 1.0, "a fraction in (0, 1] of the targeted layers' parameters")


def _method(text: str) -> str:
    if text not in ONE_SHOT_METHODS and text not in JOINT_METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; one-shot methods: {', '.join(ONE_SHOT_METHODS)}; "
                                         f"joint methods (train while they compress, need --steps): "
                                         f"{', '.join(JOINT_METHODS)}")
    return text


def _float_in(text: str, ok, what: str) -> float:
    """``float(text)`` if ``ok(value)``, else an argparse error saying it must be ``what``."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not (math.isfinite(value) and ok(value)):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def _fraction(text: str) -> float:
    return _float_in(text, lambda v: 0.0 <= v < 1.0, "a number in [0, 1)")


def _positive_float(text: str) -> float:
    return _float_in(text, lambda v: v > 0.0, "a positive finite number")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text}")
    return value


def _task_list(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise argparse.ArgumentTypeError(f"expected comma-separated task names, got {text!r}")
    return tasks


# ---------------------------------------------------------------------------------------------- inputs
def _model_dir(path: str, argname: str) -> Path:
    """``path`` as a Hugging Face model folder (a directory with config.json), else :class:`InputNotFound`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InputNotFound(f"{argname} {path!r} is not a directory (a local Hugging Face model folder is "
                            f"expected; nothing is downloaded)")
    if not (folder / "config.json").is_file():
        raise InputNotFound(f"{argname} {path!r} holds no config.json: not a Hugging Face model folder")
    return folder



def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def _check_out_dir(out: str, inputs: Sequence[Path], overwrite: bool) -> Path:
    """The ``--out`` folder, checked before any work: not an input, empty or absent unless ``--overwrite``."""
    path = Path(out).expanduser()
    for source in inputs:
        if path.resolve() == source.resolve():
            raise UsageError(f"--out {out!r} is the input folder: write to another folder")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out!r} exists and is not a directory")
    if path.is_dir() and any(path.iterdir()) and not overwrite:
        raise UsageError(f"--out {out!r} is not empty: pass --overwrite to replace it")
    return path


@contextlib.contextmanager
def _staged_dir(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out`` (renamed), on error it is removed.

    A crash never leaves a half-written checkpoint under the final name."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 folders
        if out.is_dir():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _load_texts(source: str | None, limit: int | None, seed: int | None, argname: str = "--data") -> list[str]:
    """Texts from ``source`` (None: the Debian fortunes) via :func:`lrcomp.data.load_texts`, every non-empty one."""
    from lrcomp.data import load_texts

    if source is not None:
        path = Path(source).expanduser()
        looks_like_path = path.suffix.lower() in (".txt", ".csv", ".tsv", ".jsonl", ".ndjson") \
            or source.startswith((".", "/", "~")) or os.sep in source and not path.parent.exists()
        if looks_like_path and not path.exists():
            raise InputNotFound(f"{argname} {source!r} does not exist")
    try:
        return load_texts(source, limit=limit, seed=seed, min_chars=1, max_chars=None)
    except FileNotFoundError as err:
        raise InputNotFound(f"{argname}: {_one_line(err)}") from err
    except (ValueError, ImportError) as err:
        raise CLIError(f"{argname}: {_one_line(err)}") from err


# ---------------------------------------------------------------------------------------------- models
def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - transformers is a dependency of the CLI
        raise CLIError("the lrcomp command needs transformers >= 5: pip install 'lrcomp[hf]'") from err
    global _SAVED_VERBOSITY
    if not os.environ.get("TRANSFORMERS_VERBOSITY") and _SAVED_VERBOSITY is None:
        _SAVED_VERBOSITY = transformers.logging.get_verbosity()  # main() puts it back
        transformers.logging.set_verbosity_error()  # load reports and advice would drown the output
    return transformers


_SAVED_VERBOSITY: int | None = None


def _restore_verbosity() -> None:
    global _SAVED_VERBOSITY
    if _SAVED_VERBOSITY is not None:
        import transformers

        transformers.logging.set_verbosity(_SAVED_VERBOSITY)
        _SAVED_VERBOSITY = None


def _architectures(folder: Path) -> list[str]:
    with open(folder / "config.json", encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as err:
            raise CLIError(f"{folder / 'config.json'} is not valid JSON: {err}") from err
    return list(config.get("architectures") or [])


def _is_causal_architecture(name: str) -> bool:
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def _auto_class(name: str | None, folder: Path):
    """The transformers Auto class to load ``folder`` with: ``name`` if given, else AutoModelForCausalLM when
    ``config.architectures`` names a causal LM, else AutoModel."""
    transformers = _transformers()
    if name is None:
        causal = any(_is_causal_architecture(a) for a in _architectures(folder))
        name = "AutoModelForCausalLM" if causal else "AutoModel"
    cls = getattr(transformers, name, None) if name.startswith("AutoModel") else None
    if cls is None:
        raise UsageError(f"--auto-class {name!r} is not a transformers Auto model class (AutoModel, "
                         f"AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForMaskedLM, ...)")
    return cls


def _load_model(folder: Path, auto_class, dtype: str, device: torch.device) -> nn.Module:
    """``auto_class.from_pretrained(folder)`` offline, in eval mode on ``device`` (lrcomp checkpoints too)."""
    import lrcomp  # noqa: F401  (registers quant_method "lrcomp": low-rank checkpoints load as such)

    torch_dtype = "auto" if dtype == "auto" else _DTYPES[dtype]
    try:
        model = auto_class.from_pretrained(str(folder), local_files_only=True, dtype=torch_dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        raise CLIError(f"could not load {str(folder)!r} with {auto_class.__name__}: {_one_line(err)}") from err
    return model.to(device).eval()


def _load_tokenizer(folder: Path, *, required: bool = True, pad: bool = False):
    """The tokenizer saved in ``folder`` (None if absent and not ``required``); ``pad=True`` gives it a pad
    token (eos, else unk) when it has none, for padded batches."""
    transformers = _transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as err:
        if not required:
            return None
        raise CLIError(f"no tokenizer in {str(folder)!r} ({_one_line(err)[:200]}): save one there with "
                       f"tokenizer.save_pretrained") from err
    if pad and tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise CLIError(f"the tokenizer of {str(folder)!r} has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    return tokenizer


def _is_causal_model(model: nn.Module) -> bool:
    return _is_causal_architecture(type(model).__name__)


def _max_positions(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _lowrank_layers(model: nn.Module) -> dict[str, nn.Module]:
    from lrcomp.layers import LowRankLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}


def _deployed_params(model: nn.Module) -> int:
    """Parameters of ``model`` as deployed: every parameter once (tied ones once), each LowRankLinear counted
    as ``rank (K + N)`` + bias (:meth:`LowRankLinear.num_parameters`, S folded into a factor)."""
    seen: set[int] = set()
    total = 0
    for layer in _lowrank_layers(model).values():
        total += layer.num_parameters(compact=True)
        seen |= {id(p) for p in layer.parameters()}
    return total + sum(p.numel() for p in model.parameters() if id(p) not in seen)



# ---------------------------------------------------------------------------------------------- compress
def _calibration_batches(tokenizer, texts: list[str], batch_size: int, max_length: int, causal: bool) -> list[dict]:
    """Padded batches ``{"input_ids" [B, T], "attention_mask" [B, T], ...}`` (T <= max_length); causal LMs also
    get ``"labels" [B, T]`` (the input ids, -100 on padding) so that their forward returns the LM loss."""
    batches = []
    for start in range(0, len(texts), batch_size):
        batch = dict(tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                               max_length=max_length, return_tensors="pt"))
        if causal:
            batch.pop("token_type_ids", None)
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        batches.append(batch)
    return batches


def _target_spec(names: list[str] | None, regex: str | None, default: str | None):
    """``--target-modules`` / ``--exclude-modules`` (names, suffix match) or the ``--*-regex`` form."""
    if regex is not None:
        return regex
    if names is None:
        return default
    if names == ["all-linear"]:
        return "all-linear"
    return [n for item in names for n in item.split(",") if n]


def cmd_compress(args: argparse.Namespace) -> int:
    """``lrcomp compress``: load, calibrate, compress one-shot, print the summary, save checkpoint + report.

    Joint methods go to :func:`lrcomp.cli_joint.run` (fine-tuning under transformers.Trainer). Both keep
    what is in flight in ``OUT.lrcomp-work`` (for one-shot: the calibration statistics), so the same
    command resumes an interrupted run."""
    if args.method in JOINT_METHODS:
        from lrcomp import cli_joint

        return cli_joint.run(args)
    import lrcomp
    from lrcomp.cli_joint import CALIB_FILE, open_work_dir, work_dir
    from lrcomp.integrations.hf import mark_lowrank
    from lrcomp.replace import find_target_linears

    folder = _model_dir(args.model, "MODEL")
    out = _check_out_dir(args.out, [folder], args.overwrite)
    joint_only = [opt for opt, value in (("--steps", args.steps), ("--method-option", args.method_option),
                                         ("--other-lr", args.other_lr)) if value is not None]
    if joint_only:
        raise UsageError(f"{', '.join(joint_only)}: only for the joint methods ({', '.join(JOINT_METHODS)}); "
                         f"{args.method} is one-shot")
    device = _device(args.device)
    target = _target_spec(args.target_modules, args.target_regex, "all-linear")
    exclude = _target_spec(args.exclude_modules, args.exclude_regex, None)
    auto_class = _auto_class(args.auto_class, folder)
    texts = _load_texts(args.data, args.calib_samples, args.seed)
    tokenizer = _load_tokenizer(folder, pad=True)

    started = time.perf_counter()
    _log(f"loading {folder} with {auto_class.__name__}")
    model = _load_model(folder, auto_class, args.dtype, device)
    if _lowrank_layers(model):
        raise UsageError(f"MODEL {args.model!r} is already an lrcomp low-rank checkpoint: compress the dense "
                         f"model it came from (or `lrcomp export --format dense` it first)")
    causal = _is_causal_model(model)
    work = work_dir(out)
    settings = {"model": str(folder.resolve()), "method": args.method, "data": args.data, "seed": args.seed,
                "calib_samples": args.calib_samples, "max_length": args.max_length, "batch_size": args.batch_size,
                "target": target, "exclude": exclude, "sensitivity": args.sensitivity, "dtype": args.dtype,
                "auto_class": auto_class.__name__}
    needs_loss = args.method in _GRADIENT_METHODS or args.sensitivity
    if needs_loss and not causal:
        what = f"--method {args.method}" if args.method in _GRADIENT_METHODS else "--sensitivity"
        raise UsageError(f"{what} needs gradient statistics, hence a loss on the calibration text: MODEL loads as "
                         f"{type(model).__name__}, which has none (load a causal LM with --auto-class "
                         f"AutoModelForCausalLM, or use a method without gradients, e.g. svd_llm)")
    try:
        config = lrcomp.CompressionConfig(
            method=args.method, budget=args.budget, cost=args.cost, allocation=args.allocation,
            target_modules=target, exclude_modules=exclude, min_rank=args.min_rank, sensitivity=args.sensitivity,
            calib_save_path=str(work / CALIB_FILE),
            # causal LMs: their LM loss gives the statistics a method uses when it can (Fisher, gradient covariance)
            loss_fn=(lambda outputs, batch: outputs.loss) if causal else None)
    except (ValueError, TypeError) as err:
        raise UsageError(_one_line(err)) from err
    try:
        targets = find_target_linears(model, target, exclude, required=True)
    except ValueError as err:
        raise UsageError(f"--target-modules / --exclude-modules: {_one_line(err)}") from err
    shapes = {name: (model.get_submodule(name).in_features, model.get_submodule(name).out_features,
                     model.get_submodule(name).bias is not None) for name in targets}
    params_before = _deployed_params(model)
    batches = _calibration_batches(tokenizer, texts, args.batch_size, args.max_length, causal)
    if open_work_dir(work, settings, args.restart) and (work / CALIB_FILE).is_file():
        _log(f"resuming the interrupted calibration from {work / CALIB_FILE}")
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    _log(f"{len(targets)} target layers; calibrating on {len(texts)} texts ({tokens} tokens, {len(batches)} "
         f"batches), then {args.method} at budget {args.budget:g} ({args.allocation}, {args.cost})")
    lrcomp.compress(model, config, batches)
    print(f"{type(model).__name__} from {folder}: {args.method}, budget {args.budget:g} of the targeted layers' "
          f"{args.cost} ({args.allocation} allocation)")
    lrcomp.summary(model)

    layers, ranks, kept_dense = {}, {}, []
    weights_before = weights_after = 0
    lowrank = _lowrank_layers(model)
    for name, (K, N, bias) in shapes.items():
        rank = lowrank[name].active_rank if name in lowrank else None
        after = K * N if rank is None else rank * (K + N)
        weights_before += K * N
        weights_after += after
        layers[name] = {"in_features": K, "out_features": N, "bias": bias, "rank": rank,
                        "weights_before": K * N, "weights_after": after}
        if rank is None:
            kept_dense.append(name)
        else:
            ranks[name] = rank
    params_after = _deployed_params(model)
    lowrank_before = sum(shapes[n][0] * shapes[n][1] + shapes[n][1] * shapes[n][2] for n in lowrank)
    lowrank_after = sum(m.num_parameters(compact=True) for m in lowrank.values())
    print(f"targeted weights: {weights_before:,} -> {weights_after:,} ({weights_after / weights_before:.4f}, budget "
          f"{args.budget:g}); model parameters: {params_before:,} -> {params_after:,} "
          f"({params_after / params_before:.4f}); {len(ranks)} low-rank layers, {len(kept_dense)} kept dense")

    report = {
        "lrcomp_version": lrcomp.__version__, "source_model": str(folder.resolve()),
        "architecture": type(model).__name__, "auto_class": auto_class.__name__,
        "method": args.method, "budget": args.budget, "cost": args.cost, "allocation": args.allocation,
        "sensitivity": args.sensitivity, "min_rank": args.min_rank, "target_modules": target,
        "exclude_modules": exclude,
        "calibration": {"data": args.data if args.data is not None else "fortunes (Debian)", "texts": len(texts),
                        "tokens": tokens, "max_length": args.max_length, "batch_size": args.batch_size,
                        "seed": args.seed, "loss": "causal LM loss" if causal else None},
        "params": {
            # what the budget counts (cost params): weight entries of the targeted layers, biases excluded
            "targeted_weights_before": weights_before, "targeted_weights_after": weights_after,
            "targeted_weights_kept_fraction": weights_after / weights_before,
            # what lrcomp.summary reports: the low-rank layers, biases included
            "lowrank_layers_before": lowrank_before, "lowrank_layers_after": lowrank_after,
            # the whole model, each low-rank layer as rank (K + N) + bias
            "model_before": params_before, "model_after": params_after,
            "model_kept_fraction": params_after / params_before,
        },
        "ranks": ranks, "kept_dense": kept_dense, "layers": layers,
        "device": str(device), "wall_s": None,
    }
    with _staged_dir(out) as tmp:
        if ranks:
            mark_lowrank(model)
        else:
            _log("every targeted layer stays dense at this budget: writing an ordinary checkpoint")
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        report["wall_s"] = round(time.perf_counter() - started, 3)
        _write_json(tmp / REPORT_NAME, report)
    shutil.rmtree(work, ignore_errors=True)
    print(f"saved to {out} (load it with transformers' {auto_class.__name__}.from_pretrained after `import lrcomp`; "
          f"report: {out / REPORT_NAME})")
    return EXIT_OK


def _write_json(path: str | os.PathLike, payload: dict) -> None:
    from lrcomp.atomic import write_json

    write_json(path, payload, default=str)


# ---------------------------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    """``lrcomp export``: an lrcomp checkpoint as an ordinary dense checkpoint, or re-saved as is."""
    from lrcomp.integrations.hf import to_dense

    folder = _model_dir(args.dir, "DIR")
    out = _check_out_dir(args.out, [folder], args.overwrite)
    auto_class = _auto_class(args.auto_class, folder)
    model = _load_model(folder, auto_class, args.dtype, torch.device("cpu"))
    tokenizer = _load_tokenizer(folder, required=False)
    n_lowrank = len(_lowrank_layers(model))
    if args.format == "lrcomp" and not n_lowrank:
        raise CLIError(f"DIR {args.dir!r} holds no low-rank layers (not an lrcomp checkpoint): nothing to export "
                       f"with --format lrcomp")
    with _staged_dir(out) as tmp:
        if args.format == "dense":
            to_dense(model)
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        else:
            _log(f"no tokenizer in {folder}: exported the model only")
        report = folder / REPORT_NAME
        if args.format == "lrcomp" and report.is_file():
            shutil.copyfile(report, tmp / REPORT_NAME)
    if args.format == "dense":
        print(f"exported {n_lowrank} low-rank layers as nn.Linear: an ordinary {type(model).__name__} checkpoint "
              f"in {out} ({_deployed_params(model):,} parameters; loads without lrcomp)")
    else:
        print(f"re-saved the lrcomp checkpoint ({n_lowrank} low-rank layers) to {out}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- serve
def make_server(args: argparse.Namespace):
    """The server of ``lrcomp serve``, built but not started: a :class:`lrcomp.serving.LocalServer`.

    That is transformers' own OpenAI-compatible serving app (``transformers serve``'s FastAPI routes, model
    manager and generation threads) for DIR, loaded now with lrcomp's quantizer registered, plus
    ``POST /v1/embeddings`` for encoders (:mod:`lrcomp.serving`), under uvicorn on a socket already bound to
    ``--host``/``--port`` (0: a free port; ``server.port`` says which)."""
    folder = _model_dir(args.dir, "DIR")
    try:
        from lrcomp import serving

        serving.check_serving_available()
    except ImportError as err:
        raise CLIError(_one_line(err)) from err
    try:
        name = serving.served_name(args.dir, args.served_model_name)
    except serving.OptionError as err:
        raise UsageError(_one_line(err)) from err
    device = _device(args.device)
    _transformers()  # quiet transformers' per-request log lines (uvicorn logs the requests)
    try:
        sock = serving.listen_socket(args.host, args.port)
    except OSError as err:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {_one_line(err)}") from err
    try:
        app, info = serving.build_app(folder, served_model_name=name, device=str(device), dtype=args.dtype,
                                      compile=args.compile, max_length=args.max_length, batch_size=args.batch_size)
    except serving.OptionError as err:
        sock.close()
        raise UsageError(_one_line(err)) from err
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        sock.close()
        raise CLIError(f"could not serve {str(folder)!r}: {_one_line(err)}") from err
    except BaseException:
        sock.close()
        raise
    return serving.LocalServer(app, info, sock, quiet=args.quiet)


def cmd_serve(args: argparse.Namespace) -> int:
    """``lrcomp serve``: serve DIR until interrupted (Ctrl-C: exit 0); the URL goes to stdout."""
    server = make_server(args)
    _log(server.describe())
    print(server.url, flush=True)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn shuts down gracefully on SIGINT, then re-raises it
        pass
    _log("stopped")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------- parser
def _measure(name: str):
    """``lrcomp.cli_measure.<name>``, imported when the command runs (eval, bench and report live there)."""
    def command(args: argparse.Namespace) -> int:
        from lrcomp import cli_measure

        return getattr(cli_measure, name)(args)
    return command


class _Formatter(argparse.HelpFormatter):
    """Fills the description paragraph by paragraph (blank lines kept; a paragraph of several lines, such as
    the exit codes, is kept as written) and shows the defaults other than None / False."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "\n\n".join(par if "\n" in par else super(_Formatter, self)._fill_text(par, width, indent)
                             for par in text.split("\n\n"))

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not any(action.default is v for v in (None, False, argparse.SUPPRESS)) and "%(default)" not in text \
                and action.option_strings:
            text += " (default: %(default)s)"
        return text


def _common(parser: argparse.ArgumentParser, *, device: bool = True, dtype: str | None = "auto",
            auto_class: bool = True) -> None:
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="on failure, print the full traceback")
    if device:
        parser.add_argument("--device", default="auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:1")
    if dtype is not None:
        parser.add_argument("--dtype", default=dtype, choices=(["auto"] if dtype == "auto" else []) + list(_DTYPES),
                            help="parameter dtype to load with (auto: as saved)")
    if auto_class:
        parser.add_argument("--auto-class", default=None, metavar="CLASS",
                            help="transformers Auto class to load with, e.g. AutoModel, AutoModelForCausalLM, "
                                 "AutoModelForSequenceClassification (default: AutoModelForCausalLM if "
                                 "config.architectures names a *ForCausalLM, else AutoModel)")


def build_parser() -> argparse.ArgumentParser:
    """The ``lrcomp`` argument parser with its subcommands (``args.func`` runs the chosen one)."""
    parser = argparse.ArgumentParser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Low-rank compression of Hugging Face models: compress, export, evaluate, benchmark, serve, "
                    "plot. Everything runs offline on local model folders.",
        epilog=EXIT_CODES_HELP + "\n\nRun `lrcomp COMMAND --help` for a command's options.")
    from lrcomp import __version__

    parser.add_argument("--version", action="version", version=f"lrcomp {__version__}")
    parser.add_argument("--debug", action="store_true", help="on failure, print the full traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # compress
    p = sub.add_parser(
        "compress", formatter_class=_Formatter, epilog=EXIT_CODES_HELP,
        help="low-rank compression of a local Hugging Face model (one-shot, or fine-tune and compress)",
        description="Load a local Hugging Face model folder, calibrate on --data texts (tokenized with the model's "
                    "tokenizer), compress every targeted nn.Linear one-shot (lrcomp.compress), print the per-layer "
                    "summary, and save an lrcomp checkpoint to --out (AutoModel*.from_pretrained reloads it after "
                    "`import lrcomp`) with the tokenizer and lrcomp_report.json (method, budget, parameters before "
                    "and after, ranks).\n\nThe budget counts the weight entries (or FLOPs) of the targeted layers: "
                    "r (K + N) kept against K N; biases are not counted. Causal LMs calibrate with their LM loss "
                    "too (gradient statistics for fwsvd, sparsity_aware, jactus_union, --sensitivity).\n\n"
                    f"Joint methods ({', '.join(JOINT_METHODS)}) fine-tune while they compress (give --steps): "
                    "--task lm trains causal LMs on the --data texts with their LM loss; --task classification "
                    "loads AutoModelForSequenceClassification with a new head over the labels of --data (CSV/JSONL "
                    "column label, or the category of each fortune file) and reports held-out accuracy. They run "
                    "under transformers.Trainer (lrcomp.integrations.LowRankTrainer).\n\n"
                    "Interrupted runs resume: what is in flight (run settings, calibration statistics, Trainer "
                    "checkpoints every --save-steps) lives in OUT.lrcomp-work; run the same command again to "
                    "continue, or pass --restart to discard it. It is removed when OUT is written.")
    p.add_argument("model", metavar="MODEL", help="local Hugging Face model folder (config.json, weights, tokenizer)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be absent or empty)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    p.add_argument("--method", type=_method, default="svd_llm",
                   help=f"one-shot factorisation ({', '.join(ONE_SHOT_METHODS)}) or joint method "
                        f"({', '.join(JOINT_METHODS)})")
    p.add_argument("--budget", type=_budget, default=0.5,
                   help="fraction in (0, 1] of the targeted layers' parameters (or FLOPs) to keep")
    p.add_argument("--cost", choices=("params", "flops"), default="params", help="what the budget counts")
    p.add_argument("--allocation", choices=("global", "uniform"), default="global",
                   help="global: one budget over all targets, ranks where they pay most; uniform: every layer "
                        "keeps the budget of its own parameters")
    p.add_argument("--sensitivity", action="store_true",
                   help="global allocation: weight each layer by its loss sensitivity (causal LMs only)")
    p.add_argument("--min-rank", type=_positive_int, default=1, help="smallest rank the global allocator gives")
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="calibration texts: a .txt (one per line), .csv/.jsonl (column text), a folder of fortune "
                        "files or a Hugging Face dataset name (default: the Debian fortunes)")
    p.add_argument("--calib-samples", type=_positive_int, default=128, help="calibration texts")
    p.add_argument("--max-length", type=_positive_int, default=128, help="tokens per calibration text (truncated)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="calibration texts per forward")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration text sample")
    p.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                   help="layers to compress: all-linear (every nn.Linear but the output head; the default) or "
                        "module names matched as suffixes, e.g. q_proj v_proj")
    p.add_argument("--target-regex", default=None, metavar="REGEX",
                   help="layers to compress: a regex fully matching module names (instead of --target-modules)")
    p.add_argument("--exclude-modules", nargs="+", default=None, metavar="NAME",
                   help="module names (suffix match) to leave alone")
    p.add_argument("--exclude-regex", default=None, metavar="REGEX", help="a regex of module names to leave alone")
    p.add_argument("--restart", action="store_true", help="discard an interrupted run in OUT.lrcomp-work")
    joint = p.add_argument_group("joint methods (fine-tune and compress)")
    joint.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps (required)")
    joint.add_argument("--task", choices=("auto", "lm", "classification"), default="auto",
                       help="auto: lm for causal LMs, else classification")
    joint.add_argument("--lr", type=_positive_float, default=5e-4, help="peak learning rate (linear warm-up, decay)")
    joint.add_argument("--other-lr", type=_positive_float, default=None,
                       help="learning rate of the parameters outside the targeted layers (embeddings, norms, heads; "
                            "CompressionConfig.other_lr); default: --lr")
    joint.add_argument("--train-batch-size", type=_positive_int, default=16, help="texts per optimizer step")
    joint.add_argument("--grad-accum", type=_positive_int, default=1, help="gradient accumulation steps")
    joint.add_argument("--train-samples", type=_positive_int, default=None, help="use at most this many texts")
    joint.add_argument("--eval-fraction", type=_fraction, default=0.1, help="texts held out for the final metric")
    joint.add_argument("--save-steps", type=_positive_int, default=100, help="checkpoint every N steps (resume)")
    joint.add_argument("--method-option", action="append", default=None, metavar="KEY=VALUE",
                       help="a method option of lrcomp.CompressionConfig.method_options (value read as JSON), "
                            "e.g. basis=svd_llm; repeat for several")
    _common(p, dtype="float32", auto_class=True)
    p.set_defaults(func=cmd_compress)

    # export
    p = sub.add_parser(
        "export", formatter_class=_Formatter, epilog=EXIT_CODES_HELP,
        help="re-save an lrcomp checkpoint as an ordinary dense checkpoint (or as is)",
        description="dense: load DIR (lrcomp registers its format), turn every LowRankLinear into nn.Linear "
                    "(W = U diag(S) V, lrcomp.integrations.hf.to_dense) and save an ordinary checkpoint that any "
                    "engine loads without lrcomp. lrcomp: load and re-save the low-rank checkpoint as is (e.g. "
                    "with --dtype bfloat16). The tokenizer is copied in both cases.")
    p.add_argument("dir", metavar="DIR", help="an lrcomp checkpoint folder (from `lrcomp compress`)")
    p.add_argument("--out", required=True, metavar="DIR2", help="output folder (must be absent or empty)")
    p.add_argument("--format", choices=("dense", "lrcomp"), default="dense", help="what to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    _common(p, device=False)
    p.set_defaults(func=cmd_export)

    # eval
    p = sub.add_parser(
        "eval", formatter_class=_Formatter, epilog=EXIT_CODES_HELP,
        help="perplexity, embedding cosine to a reference, lm-eval tasks",
        description="--ppl FILE (causal LMs): the file's text as read, tokenized once (with the tokenizer's "
                    "default special tokens), cut into non-overlapping windows of --window tokens; the tail shorter "
                    "than a window is dropped (a text shorter than one window is an error). Each window is scored "
                    "on its own; perplexity = exp(mean NLL over all predicted tokens, window-1 per window).\n\n"
                    "--compare REF_DIR: mean cosine of the mean-pooled, L2-normalised last hidden states "
                    "(lrcomp.models.embed) of DIR and REF_DIR on --data texts (both loaded with AutoModel).\n\n"
                    "--tasks T1,T2: lm-eval tasks through its HFLM wrapper on the loaded model (needs "
                    "`pip install lm-eval`).")
    p.add_argument("dir", metavar="DIR", help="model folder (an lrcomp checkpoint or an ordinary one)")
    p.add_argument("--ppl", default=None, metavar="TEXTFILE", help="text file for perplexity (causal LMs)")
    p.add_argument("--window", type=_positive_int, default=2048, help="tokens per perplexity window")
    p.add_argument("--ppl-batch-size", type=_positive_int, default=1, help="perplexity windows per forward")
    p.add_argument("--compare", default=None, metavar="REF_DIR", help="reference model folder for the cosine")
    p.add_argument("--data", default=None, metavar="SOURCE",
                   help="texts for --compare (.txt, .csv, .jsonl, fortune folder, dataset name; default fortunes)")
    p.add_argument("--limit", type=_positive_int, default=256, help="texts for --compare")
    p.add_argument("--seed", type=int, default=0, help="seed of the --compare text sample")
    p.add_argument("--max-length", type=_positive_int, default=128, help="tokens per --compare text")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="texts per forward (--compare, --tasks)")
    p.add_argument("--tasks", type=_task_list, default=None, metavar="T1,T2",
                   help="lm-eval task names, comma-separated (needs lm-eval)")
    p.add_argument("--num-fewshot", type=_non_negative_int, default=None, help="lm-eval few-shot examples")
    p.add_argument("--task-limit", type=_positive_int, default=None, help="lm-eval: examples per task")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    _common(p)
    p.set_defaults(func=_measure("cmd_eval"))

    # bench
    p = sub.add_parser(
        "bench", formatter_class=_Formatter, epilog=EXIT_CODES_HELP,
        help="parameters and median forward time vs a reference model",
        description="Load DIR and --reference, run the same random token batch [--batch-size, --seq-len] through "
                    "both (interleaved, after --warmup runs each) and print their parameters (low-rank layers as "
                    "rank (K + N) + bias) and median forward times on this machine (CUDA if available).")
    p.add_argument("dir", metavar="DIR", help="compressed model folder")
    p.add_argument("--reference", required=True, metavar="REF_DIR", help="reference (dense) model folder")
    p.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per forward")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="tokens per sequence")
    p.add_argument("--repeats", type=_positive_int, default=20, help="timed forwards per model")
    p.add_argument("--warmup", type=_non_negative_int, default=3, help="untimed forwards per model first")
    p.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON")
    _common(p)
    p.set_defaults(func=_measure("cmd_bench"))

    # serve
    p = sub.add_parser(
        "serve", formatter_class=_Formatter, epilog=EXIT_CODES_HELP,
        help="an OpenAI-compatible HTTP server (transformers' serving engine) for a model folder",
        description="Serve DIR with transformers' own OpenAI-compatible server (the app of `transformers serve`: "
                    "FastAPI under uvicorn), lrcomp's quantizer registered, so an lrcomp checkpoint runs with its "
                    "low-rank layers. The model loads before the server listens; the URL is printed on stdout "
                    "(--port 0 picks a free port). Ctrl-C stops it (needs `pip install 'lrcomp[serve]'`).\n\n"
                    "Causal LMs: POST /v1/completions, and POST /v1/chat/completions and /v1/responses when the "
                    "tokenizer has a chat template (\"temperature\": 0 for greedy decoding). Other models "
                    "(encoders): POST /v1/embeddings {\"input\": str or [str], \"encoding_format\": \"float\" or "
                    "\"base64\", \"normalize\": true}: mean-pooled last hidden states (the pooling of `lrcomp eval "
                    "--compare`), L2-normalised unless normalize is false. All: GET /v1/models, GET /health. "
                    "Requests name the model by --served-model-name or leave \"model\" out.")
    p.add_argument("dir", metavar="DIR", help="model folder (an lrcomp checkpoint or an ordinary one)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    p.add_argument("--port", type=_non_negative_int, default=8000, help="port (0: any free port, printed)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model id clients send as \"model\" and /v1/models lists (default: DIR as given)")
    p.add_argument("--compile", action="store_true",
                   help="transformers serve's --compile for generation: a static KV cache, and on CUDA a compiled "
                        "decode step (on the CPU only the static cache)")
    p.add_argument("--max-length", type=_positive_int, default=None,
                   help="tokens per /v1/embeddings input, truncated (default: the model's positions)")
    p.add_argument("--batch-size", type=_positive_int, default=32, help="/v1/embeddings inputs per forward")
    p.add_argument("--quiet", action="store_true", help="no log line per request")
    _common(p, auto_class=False)
    p.set_defaults(func=cmd_serve)

    # report
    p = sub.add_parser(
        "report", formatter_class=_Formatter, epilog=EXIT_CODES_HELP,
        help="plot accuracy vs kept parameters from a quality results file",
        description="Read a benchmarks/results/quality*.json file (rows with method, budget, params_kept_fraction, "
                    "acc_mean, acc_std; the dense row has budget null) and plot accuracy against the kept fraction "
                    "of the targeted parameters, one line per method with the dense row as a horizontal band. "
                    "The PNG is written atomically (a temporary file in the same folder, then os.replace).")
    p.add_argument("results", metavar="RESULTS_JSON", help="a quality results JSON file")
    p.add_argument("--out", required=True, metavar="PNG", help="the plot to write")
    p.add_argument("--title", default=None, help="plot title (default: the file name)")
    p.add_argument("--dpi", type=_positive_int, default=120, help="resolution")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="on failure, print the traceback")
    p.set_defaults(func=_measure("cmd_report"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lrcomp`` command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version (0) and usage errors (2): argparse has printed them
        code = exit_.code
        return EXIT_OK if code is None else code if isinstance(code, int) else EXIT_USAGE
    try:
        return args.func(args)
    except UsageError as err:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG} {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return err.code
    except CLIError as err:
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # anything else is a runtime failure: one line, the traceback with --debug
        if args.debug:
            traceback.print_exc()
        print(f"{PROG}: error: {type(err).__name__}: {_one_line(err)}", file=sys.stderr)
        return EXIT_FAILURE
    finally:
        _restore_verbosity()
