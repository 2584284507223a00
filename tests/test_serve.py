"""``lrcomp serve`` (:mod:`lrcomp.serving`): transformers' OpenAI-compatible server on an lrcomp checkpoint.

The real server runs on 127.0.0.1 (a free port) on a background thread of this process (built by
``lrcomp.cli.make_server``, so the CLI's options are parsed as for the command), or once as the ``lrcomp serve``
command in a subprocess; requests go through urllib. Answers are checked against the same checkpoint run in
process: ``/v1/embeddings`` against :func:`lrcomp.models.embed` (tiny compressed BERT), ``/v1/completions`` and
``/v1/chat/completions`` against greedy ``model.generate`` (tiny compressed Llama; MiniLM tokenizer, a simple chat
template). Skipped only where the serving packages (``pip install 'lrcomp[serve]'``) are absent.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import select
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("openai")

from lrcomp import cli, serving  # noqa: E402
from lrcomp.layers import LowRankLinear  # noqa: E402
from lrcomp.models import default_model_path, embed  # noqa: E402

TEXTS = [
    "The quick brown fox jumps over the lazy dog near the river.",
    "A journey of a thousand miles begins with a single step.",
    "All that glitters is not gold, and not all who wander are lost.",
    "Time flies like an arrow; fruit flies like a banana.",
    "Knowledge speaks, but wisdom listens to the quiet evening rain.",
    "An apple a day keeps the doctor away, if you aim it well.",
    "Never put off until tomorrow what you can do the day after tomorrow.",
    "The early bird catches the worm, but the second mouse gets the cheese.",
]
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")
LLAMA_NAME = "tiny-lowrank-llama"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: the CPU is shared


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """``{"bert": ..., "llama": ...}``: tiny random models with the MiniLM tokenizer, compressed by ``lrcomp
    compress`` (svd_llm, budget 0.5). The Llama tokenizer gets a chat template."""
    root = tmp_path_factory.mktemp("serve")
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(f"the MiniLM tokenizer is not available: {err}")
    torch.manual_seed(0)
    models = {
        "bert": transformers.BertModel(transformers.BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)),
        "llama": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=30522, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=256)),
    }
    (root / "data.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    out = {}
    for name, model in models.items():
        tokenizer.chat_template = CHAT_TEMPLATE if name == "llama" else None
        model.eval().save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / f"{name}_c"
        with contextlib.redirect_stdout(io.StringIO()):
            code = cli.main(["compress", str(root / name), "--out", str(out[name]), "--data", str(root / "data.txt"),
                             "--calib-samples", "8", "--batch-size", "8", "--max-length", "32", "--device", "cpu"])
        assert code == 0
    return out


@contextlib.contextmanager
def running(*argv: str):
    """``lrcomp serve ARGV --port 0 --quiet --device cpu`` built by the CLI, served on a thread while inside."""
    args = cli.build_parser().parse_args(["serve", *argv, "--port", "0", "--quiet", "--device", "cpu"])
    server = cli.make_server(args)
    cli._restore_verbosity()  # make_server quiets transformers for the command; main() would put it back
    server.start()
    try:
        yield server
    finally:
        server.stop()


def request(url: str, body: dict | bytes | None = None) -> tuple[int, dict]:
    """GET (``body`` None) or POST JSON to ``url``: (status, parsed JSON body), error statuses included."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


# ---------------------------------------------------------------------------------------------- encoder
@pytest.fixture(scope="module")
def bert_server(checkpoints):
    with running(str(checkpoints["bert"])) as server:
        yield server


@pytest.fixture(scope="module")
def bert_reference(checkpoints):
    """The compressed BERT and its tokenizer, loaded in this process as any user would."""
    folder = checkpoints["bert"]
    model = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    return model, transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def test_encoder_health_and_models(bert_server, checkpoints):
    assert bert_server.host == "127.0.0.1" and bert_server.port > 0
    assert request(bert_server.url + "/health") == (200, {"status": "ok"})
    status, body = request(bert_server.url + "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [str(checkpoints["bert"])]
    info = bert_server.info
    assert (info.kind, info.architecture, info.hidden_size, info.max_length) == ("embedding", "BertModel", 32, 512)
    assert info.lowrank_layers > 0 and "POST /v1/embeddings" in bert_server.describe()


def test_embeddings_match_in_process(bert_server, bert_reference, checkpoints):
    model, tokenizer = bert_reference
    expected = embed(model, tokenizer, TEXTS[:3], max_length=512)  # [3, 32], unit rows
    status, body = request(bert_server.url + "/v1/embeddings", {"model": str(checkpoints["bert"]),
                                                                 "input": TEXTS[:3], "encoding_format": "float"})
    assert status == 200, body
    assert body["object"] == "list" and body["model"] == str(checkpoints["bert"])
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", i) for i in range(3)]
    got = torch.tensor([d["embedding"] for d in body["data"]])
    assert got.shape == (3, 32) and torch.allclose(got, expected, rtol=0, atol=1e-6)
    tokens = sum(len(ids) for ids in tokenizer(TEXTS[:3])["input_ids"])
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}

    status, body = request(bert_server.url + "/v1/embeddings", {"input": TEXTS[3]})  # one string, model left out
    assert status == 200 and len(body["data"]) == 1
    assert torch.allclose(torch.tensor(body["data"][0]["embedding"]),
                          embed(model, tokenizer, [TEXTS[3]], max_length=512)[0], rtol=0, atol=1e-6)


def test_embeddings_base64_and_unnormalized(bert_server, bert_reference):
    model, tokenizer = bert_reference
    status, body = request(bert_server.url + "/v1/embeddings", {"input": TEXTS[:2], "encoding_format": "base64"})
    assert status == 200
    got = torch.stack([torch.frombuffer(bytearray(base64.b64decode(d["embedding"])), dtype=torch.float32)
                       for d in body["data"]])  # little-endian float32, as OpenAI clients decode it
    assert torch.allclose(got, embed(model, tokenizer, TEXTS[:2], max_length=512), rtol=0, atol=1e-6)

    status, body = request(bert_server.url + "/v1/embeddings", {"input": TEXTS[:2], "normalize": False})
    assert status == 200
    batch = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [2, T, 32]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    expected = (hidden * mask).sum(1) / mask.sum(1)  # mean over the real tokens
    got = torch.tensor([d["embedding"] for d in body["data"]])
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6) and not torch.allclose(got.norm(dim=1), torch.ones(2))


@pytest.mark.parametrize(("body", "status", "param"), [
    ({}, 400, "input"),  # missing input
    ({"input": []}, 400, "input"),
    ({"input": [1, 2, 3]}, 400, "input"),  # token ids
    ({"input": "a", "encoding_format": "int8"}, 400, "encoding_format"),
    ({"input": "a", "dimensions": 8}, 400, "dimensions"),
    ({"input": "a", "normalise": True}, 400, "normalise"),
    ({"input": "a", "model": "another-model"}, 404, "model"),
    (b"not json", 400, None),
    (b"[1, 2]", 400, None),
])
def test_bad_embeddings_request_is_a_json_4xx(bert_server, body, status, param):
    got, answer = request(bert_server.url + "/v1/embeddings", body)
    assert got == status, answer
    assert answer["error"]["type"] == "invalid_request_error" and answer["error"]["param"] == param
    assert answer["error"]["message"]
    assert request(bert_server.url + "/health")[0] == 200  # still serving


def test_encoder_refuses_generation_routes(bert_server):
    for route, body in (("/v1/completions", {"prompt": "hi"}),
                        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})):
        status, answer = request(bert_server.url + route, body)
        assert status == 400 and "not a causal LM" in answer["error"]["message"]


# ---------------------------------------------------------------------------------------------- causal LM
@pytest.fixture(scope="module")
def llama_server(checkpoints):
    with running(str(checkpoints["llama"]), "--served-model-name", LLAMA_NAME) as server:
        yield server


@pytest.fixture(scope="module")
def llama_reference(checkpoints):
    folder = checkpoints["llama"]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    assert any(isinstance(m, LowRankLinear) for m in model.modules())
    return model, transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def greedy(model, tokenizer, inputs: dict, max_new_tokens: int) -> str:
    """In-process greedy continuation of ``inputs`` ([1, T] tensors), decoded without special tokens."""
    inputs = {k: v for k, v in inputs.items() if k != "token_type_ids"}  # a decoder takes none
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)  # [1, T + n]
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def test_causal_models_and_health(llama_server):
    assert request(llama_server.url + "/health") == (200, {"status": "ok"})
    status, body = request(llama_server.url + "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [LLAMA_NAME]
    assert llama_server.info.kind == "generative" and llama_server.info.lowrank_layers > 0
    status, answer = request(llama_server.url + "/v1/embeddings", {"input": "hi"})
    assert status == 400 and "causal LM" in answer["error"]["message"]


@pytest.mark.parametrize("prompt", ["The quick brown fox", "Once upon a time, in a land far away,"])
def test_completions_match_generate(llama_server, llama_reference, prompt):
    model, tokenizer = llama_reference
    status, body = request(llama_server.url + "/v1/completions",
                           {"model": LLAMA_NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0})
    assert status == 200, body
    expected = greedy(model, tokenizer, tokenizer(prompt, return_tensors="pt"), 8)
    assert expected and body["choices"][0]["text"] == expected
    assert body["usage"]["completion_tokens"] <= 8 and body["object"] == "text_completion"


def test_chat_completions_match_generate(llama_server, llama_reference):
    model, tokenizer = llama_reference
    messages = [{"role": "user", "content": "Tell me about low-rank matrices."}]
    status, body = request(llama_server.url + "/v1/chat/completions",
                           {"messages": messages, "max_tokens": 6, "temperature": 0})
    assert status == 200, body
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert body["choices"][0]["message"]["content"] == greedy(model, tokenizer, inputs, 6)


def test_causal_other_model_name_is_refused(llama_server):
    status, _ = request(llama_server.url + "/v1/completions", {"model": "gpt2", "prompt": "hi", "max_tokens": 2})
    assert status == 400


def test_no_chat_template_refuses_chat(checkpoints, tmp_path):
    folder = tmp_path / "llama_nochat"
    folder.mkdir()
    for file in checkpoints["llama"].iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    with running(str(folder)) as server:
        assert server.info.routes == ["POST /v1/completions"]
        status, answer = request(server.url + "/v1/chat/completions",
                                 {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        assert status == 400 and "no chat template" in answer["error"]["message"]
        assert request(server.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2, "temperature": 0})[0] == 200


# ---------------------------------------------------------------------------------------------- the command
def test_serve_command_prints_url_and_stops_on_ctrl_c(checkpoints):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "lrcomp", "serve", str(checkpoints["bert"]), "--port", "0",
                             "--device", "cpu", "--served-model-name", "minibert"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 180)
        url = proc.stdout.readline().strip() if ready else ""
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read() if proc.poll() is not None else url
        status, body = request(url + "/v1/embeddings", {"model": "minibert", "input": "hello"})
        assert status == 200 and len(body["data"][0]["embedding"]) == 32
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert "serving BertModel" in err and "'minibert'" in err and "stopped" in err
    assert '"POST /v1/embeddings HTTP/1.1" 200' in err  # uvicorn's access log, on stderr


def test_missing_dir_exits_3(tmp_path, capsys):
    code = cli.main(["serve", str(tmp_path / "nope"), "--port", "0"])
    assert code == 3 and "DIR" in capsys.readouterr().err


def test_serving_extra_missing_exits_1_with_install_hint(checkpoints, capsys, monkeypatch):
    def unavailable():
        raise serving.ServingUnavailable(f"lrcomp serve needs FastAPI ...: {serving.INSTALL_HINT}")

    monkeypatch.setattr(serving, "check_serving_available", unavailable)
    code = cli.main(["serve", str(checkpoints["bert"]), "--port", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "pip install 'lrcomp[serve]'" in err and "Traceback" not in err


def test_bad_options_exit_2(checkpoints, capsys):
    assert cli.main(["serve", str(checkpoints["bert"]), "--served-model-name", "a@b", "--port", "0"]) == 2
    assert "--served-model-name" in capsys.readouterr().err
    assert cli.main(["serve", str(checkpoints["bert"]), "--compile", "--port", "0", "--device", "cpu"]) == 2
    assert "compile" in capsys.readouterr().err


def test_taken_port_exits_1(checkpoints, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        code = cli.main(["serve", str(checkpoints["bert"]), "--port", str(taken.getsockname()[1])])
    assert code == 1 and "cannot listen on 127.0.0.1" in capsys.readouterr().err
