"""The ``lrcomp`` command line (:mod:`lrcomp.cli`), on tiny models built here (CPU, a few seconds each).

Models: a tiny ``BertModel`` (hidden 32, 2 layers) and a tiny ``LlamaForCausalLM`` (GPT-2 uses ``Conv1D``, which
lrcomp does not target), both saved with the MiniLM tokenizer. Most commands run in-process through
``lrcomp.cli.main``; the console script runs once in a subprocess, and the dense export is loaded in a
subprocess that never imports lrcomp.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lrcomp import cli  # noqa: E402
from lrcomp.layers import LowRankLinear  # noqa: E402
from lrcomp.models import default_model_path  # noqa: E402

SENTENCES = [
    "The quick brown fox jumps over the lazy dog near the river.",
    "A journey of a thousand miles begins with a single step.",
    "All that glitters is not gold, and not all who wander are lost.",
    "The early bird catches the worm, but the second mouse gets the cheese.",
    "Time flies like an arrow; fruit flies like a banana.",
    "Never put off until tomorrow what you can do the day after tomorrow.",
    "An apple a day keeps the doctor away, if you aim it well.",
    "Knowledge speaks, but wisdom listens to the quiet evening rain.",
]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the CPU is shared


def _tokenizer():
    try:
        path = default_model_path()
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"the MiniLM tokenizer is not available: {err}")
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder with ``bert/`` and ``llama/`` (tiny random models + the MiniLM tokenizer) and ``data.txt``."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = _tokenizer()
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)).eval()
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=256)).eval()
    for name, model in (("bert", bert), ("llama", llama)):
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
    (root / "data.txt").write_text("\n".join(SENTENCES) + "\n", encoding="utf-8")
    return root


def run(argv: list, capsys=None) -> tuple[int, str, str]:
    """``lrcomp.cli.main(argv)`` -> (exit code, stdout, stderr) (captured with capsys when given)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


def compress_args(model: Path, out: Path, data: Path, *extra) -> list:
    return ["compress", model, "--out", out, "--data", data, "--calib-samples", 8, "--batch-size", 8,
            "--max-length", 32, "--device", "cpu", *extra]


@pytest.fixture(scope="module")
def compressed_bert(workdir) -> tuple[Path, str]:
    """The tiny BERT compressed with svd_llm at 0.5 (global): (folder, what the command printed)."""
    import contextlib
    import io

    out = workdir / "bert_c"
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main([str(a) for a in compress_args(workdir / "bert", out, workdir / "data.txt",
                                                       "--budget", "0.5")])
    assert code == 0
    return out, buffer.getvalue()


def python(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def ids() -> torch.Tensor:
    """``[2, 9]`` token ids."""
    return torch.randint(1000, 30000, (2, 9), generator=torch.Generator().manual_seed(3))


# ---------------------------------------------------------------------------------------------- help
def test_console_script_help(tmp_path):
    script = shutil.which("lrcomp") or str(Path(sys.executable).parent / "lrcomp")
    if not os.path.exists(script):
        pytest.skip("the lrcomp console script is not installed (pip install -e .)")
    done = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for word in ("compress", "export", "eval", "bench", "serve", "report", "exit codes"):
        assert word in done.stdout


def test_subcommand_help(capsys):
    code, out, _ = run(["compress", "--help"], capsys)
    assert code == 0
    assert "--budget" in out and "svd_llm" in out and "exit codes" in out and "(default: 0.5)" in out


# ---------------------------------------------------------------------------------------------- compress
def test_compress_reloads_lowrank_within_budget(compressed_bert):
    import lrcomp  # noqa: F401  (registers the checkpoint format)

    out, printed = compressed_bert
    report = json.loads((out / cli.REPORT_NAME).read_text())
    assert report["method"] == "svd_llm" and report["budget"] == 0.5 and report["allocation"] == "global"
    model = transformers.AutoModel.from_pretrained(out, local_files_only=True)
    lowrank = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert lowrank and {name: m.rank for name, m in lowrank.items()} == report["ranks"]
    assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()

    # the budget counts the targeted layers' weights exactly: sum r (K + N) (+ K N for layers kept dense)
    kept = before = 0
    for name, layer in report["layers"].items():
        K, N = layer["in_features"], layer["out_features"]
        module = model.get_submodule(name)
        kept += module.rank * (K + N) if isinstance(module, LowRankLinear) else K * N
        before += K * N
    assert before == report["params"]["targeted_weights_before"]
    assert kept == report["params"]["targeted_weights_after"] <= math.floor(0.5 * before)

    # lrcomp.summary's total row (low-rank layers, biases included) matches the reloaded layers and the report
    total = re.search(r"^total\s+([\d.]+)\s+([\d,]+)\s+([\d,]+)$", printed, re.M)
    assert total, printed
    summary_before, summary_after = (int(total.group(i).replace(",", "")) for i in (2, 3))
    assert summary_after == sum(m.num_parameters(compact=True) for m in lowrank.values())
    assert summary_before == sum(m.in_features * m.out_features + m.out_features for m in lowrank.values())
    assert (summary_before, summary_after) == (report["params"]["lowrank_layers_before"],
                                               report["params"]["lowrank_layers_after"])


def test_compress_causal_uniform_named_targets(workdir, capsys):
    import lrcomp  # noqa: F401

    out = workdir / "llama_uniform"
    code, printed, err = run(compress_args(workdir / "llama", out, workdir / "data.txt", "--method", "svd",
                                           "--allocation", "uniform", "--budget", "0.5",
                                           "--target-modules", "q_proj", "v_proj"), capsys)
    assert code == 0, err
    assert "LlamaForCausalLM" in printed
    model = transformers.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    lowrank = {name: m for name, m in model.named_modules() if isinstance(m, LowRankLinear)}
    assert sorted(lowrank) == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    assert all(m.rank == int(0.5 * 32 * 32 / 64) for m in lowrank.values())  # floor(b K N / (K + N)) = 8


# ---------------------------------------------------------------------------------------------- export
def test_export_dense_loads_without_lrcomp(workdir, compressed_bert, capsys):
    import lrcomp  # noqa: F401

    source, _ = compressed_bert
    dense = workdir / "bert_dense"
    code, _, err = run(["export", source, "--out", dense, "--format", "dense"], capsys)
    assert code == 0, err
    assert "quantization_config" not in json.loads((dense / "config.json").read_text())
    torch.save(ids(), workdir / "ids.pt")
    done = python(
        "import sys, torch\n"
        "from transformers import AutoModel\n"
        f"m = AutoModel.from_pretrained({str(dense)!r}, local_files_only=True).eval()\n"
        "assert 'lrcomp' not in sys.modules\n"
        "assert not any('LowRank' in type(x).__name__ for x in m.modules())\n"
        f"with torch.no_grad(): h = m(torch.load({str(workdir / 'ids.pt')!r})).last_hidden_state\n"
        f"torch.save(h, {str(workdir / 'dense_hidden.pt')!r})\n", workdir)
    assert done.returncode == 0, done.stderr
    lowrank = transformers.AutoModel.from_pretrained(source, local_files_only=True).eval()
    with torch.no_grad():
        expected = lowrank(ids()).last_hidden_state  # [2, 9, 32]
    torch.testing.assert_close(torch.load(workdir / "dense_hidden.pt"), expected, atol=1e-5, rtol=1e-5)

    again = workdir / "bert_again"
    code, _, err = run(["export", source, "--out", again, "--format", "lrcomp"], capsys)
    assert code == 0, err
    reloaded = transformers.AutoModel.from_pretrained(again, local_files_only=True).eval()
    assert any(isinstance(m, LowRankLinear) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids()).last_hidden_state, expected, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------- eval
def test_eval_ppl_matches_hand_computation(workdir, capsys):
    text_file = workdir / "ppl.txt"
    text_file.write_text(" ".join(SENTENCES * 2) + "\n", encoding="utf-8")
    result = workdir / "ppl.json"
    code, printed, err = run(["eval", workdir / "llama", "--ppl", text_file, "--window", 64, "--json", result,
                              "--device", "cpu"], capsys)
    assert code == 0, err
    got = json.loads(result.read_text())["ppl"]

    # the stated convention, by hand: the file's text tokenized once; full windows of 64; NLL of every token
    # of a window but the first, given the window's tokens before it; mean over all of them, then exp
    tokenizer = transformers.AutoTokenizer.from_pretrained(workdir / "llama", local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(workdir / "llama", local_files_only=True).eval()
    tokens = tokenizer(text_file.read_text(encoding="utf-8"))["input_ids"]
    n_windows = len(tokens) // 64
    assert n_windows >= 2
    nll = []
    with torch.no_grad():
        for w in range(n_windows):
            window = torch.tensor(tokens[w * 64:(w + 1) * 64])  # [64]
            logp = torch.log_softmax(model(window[None]).logits[0].double(), dim=-1)  # [64, V]
            nll += [-float(logp[t - 1, window[t]]) for t in range(1, 64)]
    expected = math.exp(sum(nll) / len(nll))
    assert got["windows"] == n_windows and got["predicted_tokens"] == len(nll) == n_windows * 63
    assert got["dropped_tokens"] == len(tokens) - n_windows * 64
    assert got["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert f"perplexity {got['perplexity']:.4f}" in printed


def test_eval_ppl_text_shorter_than_window(workdir, capsys):
    short = workdir / "short.txt"
    short.write_text("too short\n", encoding="utf-8")
    code, _, err = run(["eval", workdir / "llama", "--ppl", short, "--window", 64, "--device", "cpu"], capsys)
    assert code == 1
    assert "fewer than one window" in err and "Traceback" not in err
    code, _, err = run(["eval", workdir / "llama", "--ppl", short, "--window", 64, "--device", "cpu", "--debug"],
                       capsys)
    assert code == 1 and "Traceback" in err


def test_eval_compare_self_is_one(workdir, capsys):
    result = workdir / "compare.json"
    code, printed, err = run(["eval", workdir / "bert", "--compare", workdir / "bert", "--data",
                              workdir / "data.txt", "--limit", 6, "--json", result, "--device", "cpu"], capsys)
    assert code == 0, err
    compare = json.loads(result.read_text())["compare"]
    assert compare["texts"] == 6
    assert compare["cos_mean"] == pytest.approx(1.0, abs=1e-5) and compare["cos_min"] == pytest.approx(1.0, abs=1e-5)
    assert "embedding cosine" in printed


# ---------------------------------------------------------------------------------------------- bench, report
def test_bench_prints_both_rows(workdir, compressed_bert, capsys):
    source, _ = compressed_bert
    result = workdir / "bench.json"
    code, printed, err = run(["bench", source, "--reference", workdir / "bert", "--batch-size", 2, "--seq-len", 16,
                              "--repeats", 2, "--warmup", 0, "--device", "cpu", "--json", result], capsys)
    assert code == 0, err
    lines = printed.splitlines()
    assert any(line.startswith("compressed") for line in lines) and any(line.startswith("reference") for line in lines)
    rows = {r["model"]: r for r in json.loads(result.read_text())["rows"]}
    assert rows["compressed"]["params"] < rows["reference"]["params"] and rows["compressed"]["lowrank_layers"] > 0
    assert rows["reference"]["lowrank_layers"] == 0 and rows["compressed"]["median_ms"] > 0


def test_report_writes_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    rows = [{"method": "dense", "budget": None, "status": "ok", "acc_mean": 0.75, "acc_std": 0.01,
             "params_kept_fraction": 1.0}]
    rows += [{"method": m, "budget": b, "status": "ok", "acc_mean": 0.7 + 0.05 * b - 0.01 * i, "acc_std": 0.005,
              "params_kept_fraction": b + 0.001} for i, m in enumerate(("jactus", "seq_svd")) for b in (0.3, 0.5, 0.8)]
    rows.append({"method": "acip", "budget": 0.5, "status": "failed", "acc_mean": None, "acc_std": None,
                 "params_kept_fraction": None})
    results = tmp_path / "quality_test.json"
    results.write_text(json.dumps({"kind": "quality", "rows": rows}))
    out = tmp_path / "plots" / "quality.png"
    code, printed, err = run(["report", results, "--out", out], capsys)
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["quality.png"]  # no temporary file left
    assert "2 methods" in printed


def test_report_axis_leaves_out_a_collapsed_run():
    from lrcomp.plots import _axis_floor, quality_figure

    good = [0.70, 0.72, 0.74, 0.75, 0.71]
    assert _axis_floor(good) is None  # nothing far below: matplotlib's own limits
    floor = _axis_floor([*good, 0.18])
    assert floor == pytest.approx(0.70 - 0.03)  # the lowest kept value, a margin below
    rows = [{"method": "m", "budget": b, "acc_mean": a, "acc_std": 0.0, "params_kept_fraction": b}
            for b, a in ((0.3, 0.70), (0.5, 0.72), (0.8, 0.18))]
    fig = quality_figure(rows)
    try:
        ax = fig.axes[0]
        assert ax.get_ylim()[0] == pytest.approx(0.67)
        assert any("m: 0.180" in t.get_text() for t in ax.texts)  # the collapsed point is named at the edge
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)


def test_report_second_panel_shows_the_paired_difference_in_each_methods_color():
    from lrcomp.plots import quality_figure

    rows = [{"method": "seq_svd_llm", "budget": b, "acc_mean": 0.7, "acc_std": 0.0, "params_kept_fraction": b}
            for b in (0.3, 0.8)]
    rows += [{"method": "jactus", "budget": b, "acc_mean": 0.7 + d, "acc_std": 0.0, "params_kept_fraction": b,
              "vs_seq_mean": d, "vs_seq_std": 0.01} for b, d in ((0.3, -0.02), (0.8, 0.01))]
    import matplotlib.pyplot as plt

    assert len(quality_figure(rows[:2]).axes) == 1  # no paired differences: one panel
    fig = quality_figure(rows)
    try:
        top, bottom = fig.axes
        line = next(c for c in top.containers if c.get_label() == "jactus").lines[0]
        points = next(c for c in bottom.containers if c.get_label() == "jactus").lines[0]
        assert points.get_color() == line.get_color()
        assert sorted(points.get_ydata()) == pytest.approx([-0.02, 0.01])
        assert [t.get_text() for t in bottom.get_xticklabels()] == ["budget 0.8", "budget 0.3"]
    finally:
        plt.close("all")


# ---------------------------------------------------------------------------------------------- errors
def test_missing_model_dir_exits_3(workdir, capsys):
    code, _, err = run(["compress", workdir / "no_such_model", "--out", workdir / "x"], capsys)
    assert code == 3 and "MODEL" in err and err.startswith("lrcomp: error:") and "Traceback" not in err


def test_missing_data_file_exits_3(workdir, capsys):
    code, _, err = run(compress_args(workdir / "bert", workdir / "x", workdir / "missing.txt"), capsys)
    assert code == 3 and "--data" in err


@pytest.mark.parametrize("budget", ["1.5", "0", "-0.2", "nan", "half"])
def test_bad_budget_exits_2(workdir, capsys, budget):
    code, _, err = run(["compress", workdir / "bert", "--out", workdir / "x", "--budget", budget], capsys)
    assert code == 2 and "argument --budget" in err and "(0, 1]" in err


def test_unknown_method_lists_known(workdir, capsys):
    code, _, err = run(["compress", workdir / "bert", "--out", workdir / "x", "--method", "nope"], capsys)
    assert code == 2 and "unknown method 'nope'" in err and "svd_llm" in err and "jactus_union" in err


def test_out_not_empty_exits_2(workdir, compressed_bert, capsys):
    source, _ = compressed_bert
    code, _, err = run(compress_args(workdir / "bert", source, workdir / "data.txt"), capsys)
    assert code == 2 and "--overwrite" in err


def test_tasks_without_lm_eval_exits_1(workdir, capsys, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    code, _, err = run(["eval", workdir / "llama", "--tasks", "hellaswag,arc_easy"], capsys)
    assert code == 1 and "pip install lm-eval" in err and "Traceback" not in err


def test_eval_needs_something_to_do(workdir, capsys):
    code, _, err = run(["eval", workdir / "bert"], capsys)
    assert code == 2 and "--ppl" in err
