"""``lrcomp compress --method <joint>`` (:mod:`lrcomp.cli_joint`): fine-tune and compress under Trainer, resume.

Tiny random models with the MiniLM tokenizer, a few optimizer steps each, on the CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

import lrcomp  # noqa: E402,F401  (registers the checkpoint format)
from lrcomp import cli  # noqa: E402
from lrcomp.integrations.trainer import LowRankCallback  # noqa: E402
from lrcomp.layers import LowRankLinear  # noqa: E402
from lrcomp.models import default_model_path  # noqa: E402

WORDS = ("apple river stone cloud music bread window garden letter silver forest candle paper engine "
         "winter doctor market bridge thunder pencil").split()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the CPU is shared


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """``bert/`` and ``llama/`` (tiny random models + the MiniLM tokenizer) and ``labeled.jsonl`` (2 classes)."""
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    except (ImportError, FileNotFoundError, OSError) as err:
        pytest.skip(f"the MiniLM tokenizer is not available: {err}")
    folder = tmp_path_factory.mktemp("cli_joint")
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256))
    for name, model in (("bert", bert), ("llama", llama)):
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
    rows = []
    for i in range(32):  # class 0: the first half of the words, class 1: the second half
        label = i % 2
        pool = WORDS[:10] if label == 0 else WORDS[10:]
        rows.append({"text": " ".join(pool[(i * 3 + k) % 10] for k in range(6)), "label": f"c{label}"})
    (folder / "labeled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


def run(argv: list, capsys=None) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def joint_args(model: Path, out: Path, data: Path, method: str, *extra) -> list:
    return ["compress", model, "--out", out, "--data", data, "--method", method, "--budget", 0.5, "--steps", 4,
            "--train-batch-size", 4, "--calib-samples", 8, "--batch-size", 8, "--max-length", 16,
            "--device", "cpu", "--lr", 1e-3, *extra]


def targeted_kept(report: dict) -> float:
    return report["params"]["targeted_weights_kept_fraction"]


@pytest.mark.parametrize("method,extra", [("jactus", ()), ("acip", ("--method-option", "lora_rank=2"))])
def test_classification_run_writes_a_loadable_compact_model(root, tmp_path, capsys, method, extra):
    out = tmp_path / "out"
    code, printed, err = run(joint_args(root / "bert", out, root / "labeled.jsonl", method,
                                        "--eval-fraction", 0.25, *extra), capsys)
    assert code == 0, err
    report = json.loads((out / cli.REPORT_NAME).read_text())
    assert report["task"] == "classification" and report["labels"] == ["c0", "c1"]
    assert report["eval_texts"] == 8 and 0.0 <= report["eval"]["accuracy"] <= 1.0
    assert targeted_kept(report) <= 0.5 + 1e-9
    assert not (tmp_path / "out.lrcomp-work").exists()  # the work folder goes once OUT is written
    assert "held-out accuracy" in printed
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out, local_files_only=True)
    lowrank = {n: m for n, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert lowrank and {n: m.active_rank for n, m in lowrank.items()} == report["ranks"]
    assert not any(n.endswith("classifier") for n in lowrank)  # the new head is trained, never compressed
    assert model.config.id2label == {0: "c0", 1: "c1"}


def test_other_lr_reaches_the_optimizer(root, tmp_path, capsys, monkeypatch):
    groups = []
    parameters = lrcomp.Compressor.parameters

    def spy(comp):
        groups[:] = parameters(comp)
        groups.append(comp.model)
        return groups[:-1]

    monkeypatch.setattr(lrcomp.Compressor, "parameters", spy)
    out = tmp_path / "out"
    code, _, err = run(joint_args(root / "bert", out, root / "labeled.jsonl", "jactus", "--other-lr", 1e-5), capsys)
    assert code == 0, err
    assert json.loads((out / cli.REPORT_NAME).read_text())["other_lr"] == 1e-5
    model = groups.pop()
    names = {id(p): n for n, p in model.named_parameters()}
    other = groups[-1]
    assert other["lr"] == 1e-5 and other["params"]
    assert "classifier.weight" in {names[id(p)] for p in other["params"]}
    inside = {id(p) for m in model.modules() if isinstance(m, LowRankLinear) for p in m.parameters()}
    assert inside and not inside & {id(p) for p in other["params"]}  # the targeted layers stay at --lr


def test_lm_run(root, tmp_path, capsys):
    out = tmp_path / "out"
    code, printed, err = run(joint_args(root / "llama", out, root / "labeled.jsonl", "tunecomp"), capsys)
    assert code == 0, err
    report = json.loads((out / cli.REPORT_NAME).read_text())
    assert report["task"] == "lm" and report["eval"]["perplexity"] > 1.0
    assert targeted_kept(report) <= 0.5 + 1e-9
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert any(isinstance(m, LowRankLinear) for m in model.modules())


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


# ACIP compacts its layers before the checkpoint of step 3; LPAF, JACTUS and ACIP with a dense warm-up replace the
# dense weights by new parameters in the optimizer at step 2, which the resumed Trainer's optimizer must line up with.
@pytest.mark.parametrize("method,options", [
    ("acip", ("lora_rank=2",)), ("acip", ("lora_rank=2", "warmup_frac=0.3")), ("lpaf", ("prune_frac=0.3",)),
    ("jactus", ("warmup_frac=0.3",)),
    ("jactus", ("warmup_frac=0.3", "train_bases=true"))])
def test_interrupted_run_resumes_to_the_uninterrupted_result(root, tmp_path, capsys, monkeypatch, method, options):
    extra = ("--steps", 6, "--save-steps", 3, "--seed", 1, *(a for o in options for a in ("--method-option", o)))
    whole = tmp_path / "whole"
    code, _, err = run(joint_args(root / "llama", whole, root / "labeled.jsonl", method, *extra), capsys)
    assert code == 0, err

    out = tmp_path / "out"
    original = LowRankCallback.on_step_end

    def crash_at_5(self, args, state, control, **kwargs):
        if state.global_step == 5:
            raise KeyboardInterrupt  # Ctrl-C after the checkpoint of step 3
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(LowRankCallback, "on_step_end", crash_at_5)
    code, _, err = run(joint_args(root / "llama", out, root / "labeled.jsonl", method, *extra), capsys)
    assert code == 130 and "interrupted" in err
    work = tmp_path / "out.lrcomp-work"
    assert (work / "trainer" / "checkpoint-3").is_dir() and not out.exists()

    monkeypatch.setattr(LowRankCallback, "on_step_end", original)
    code, _, err = run(joint_args(root / "llama", out, root / "labeled.jsonl", method, *extra), capsys)
    assert code == 0, err
    assert "resuming the interrupted run from" in err and not work.exists()
    report = json.loads((out / cli.REPORT_NAME).read_text())
    assert report["resumed_from"].endswith("checkpoint-3")
    assert report["ranks"] == json.loads((whole / cli.REPORT_NAME).read_text())["ranks"]
    resumed, reference = _state(out), _state(whole)
    assert resumed.keys() == reference.keys()
    for key in reference:  # the same bits: same seeds, same data order, state restored exactly
        assert torch.equal(resumed[key], reference[key]), key


def test_other_settings_do_not_resume(root, tmp_path, capsys):
    out = tmp_path / "out"
    work = tmp_path / "out.lrcomp-work"
    work.mkdir()
    (work / "run.json").write_text(json.dumps({"method": "acip", "budget": 0.3}))
    code, _, err = run(joint_args(root / "bert", out, root / "labeled.jsonl", "jactus"), capsys)
    assert code == 2 and "other settings" in err and "--restart" in err
    code, _, err = run(joint_args(root / "bert", out, root / "labeled.jsonl", "jactus", "--restart"), capsys)
    assert code == 0, err


def test_bad_joint_arguments(root, tmp_path, capsys):
    out = tmp_path / "out"
    args = joint_args(root / "bert", out, root / "labeled.jsonl", "acip")
    no_steps = args[:args.index("--steps")] + args[args.index("--steps") + 2:]
    code, _, err = run(no_steps, capsys)
    assert code == 2 and "--steps" in err
    code, _, err = run(["compress", root / "bert", "--out", out, "--method", "svd_llm", "--steps", 3], capsys)
    assert code == 2 and "only for the joint methods" in err
    code, _, err = run(["compress", root / "bert", "--out", out, "--method", "svd_llm", "--other-lr", 1e-4], capsys)
    assert code == 2 and "--other-lr" in err and "only for the joint methods" in err
    code, _, err = run([*args, "--task", "lm"], capsys)
    assert code == 2 and "causal LM" in err
    code, _, err = run([*args, "--method-option", "novalue"], capsys)
    assert code == 2 and "KEY=VALUE" in err
    code, _, err = run(["compress", root / "bert", "--out", out, "--method", "nope"], capsys)
    assert code == 2 and "acip" in err and "svd_llm" in err


def test_interrupted_one_shot_compress_resumes_its_calibration(root, tmp_path, capsys, monkeypatch):
    import lrcomp.integrations.hf as hf

    def args(out):
        return ["compress", root / "bert", "--out", out, "--data", root / "labeled.jsonl", "--method", "svd_llm",
                "--calib-samples", 8, "--batch-size", 4, "--max-length", 16, "--device", "cpu"]

    code, _, err = run(args(tmp_path / "whole"), capsys)
    assert code == 0, err
    original = hf.mark_lowrank

    def interrupted(model):
        raise KeyboardInterrupt  # after calibration and factorisation, before anything is written

    monkeypatch.setattr(hf, "mark_lowrank", interrupted)
    out = tmp_path / "out"
    code, _, err = run(args(out), capsys)
    assert code == 130 and not out.exists()
    assert (tmp_path / "out.lrcomp-work" / "calib.safetensors").is_file()
    monkeypatch.setattr(hf, "mark_lowrank", original)
    code, _, err = run(args(out), capsys)
    assert code == 0, err
    assert "resuming the interrupted calibration" in err and not (tmp_path / "out.lrcomp-work").exists()
    resumed, reference = _state(out), _state(tmp_path / "whole")
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
