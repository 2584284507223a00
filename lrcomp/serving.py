"""``lrcomp serve``: an OpenAI-compatible HTTP server for a model folder, on transformers' own serving engine.

The app is the one ``transformers serve`` runs (``transformers.cli.serving``: FastAPI routes, its model
manager, its generation threads), built here in a process where lrcomp's quantizer is registered, so an lrcomp
checkpoint loads with its :class:`~lrcomp.layers.LowRankLinear` layers. The model is loaded (and, for an
encoder, run once) before the server listens; the server is pinned to it.

Routes, by model kind (``config.architectures``):

- causal LM (``*ForCausalLM``, and the image-text / multimodal LMs transformers serves): transformers'
  ``POST /v1/completions``, ``POST /v1/chat/completions`` (needs a chat template in the tokenizer) and
  ``POST /v1/responses``, streaming or not; greedy with ``"temperature": 0``.
- any other model (an encoder, e.g. BERT / MiniLM): ``POST /v1/embeddings`` (OpenAI's request and response),
  the mean of the last hidden states over the attention mask, L2-normalised unless ``"normalize": false``
  (:func:`lrcomp.models.embed`, the pooling ``lrcomp eval --compare`` uses).
- both: ``GET /health`` and ``GET /v1/models`` (the served model only). A route of the other kind answers
  400 with a JSON error.

Clients name the model by its served name (default: the folder as given on the command line) or leave
``"model"`` out.

Needs the ``serve`` extra (FastAPI, uvicorn, pydantic, openai: ``pip install 'lrcomp[serve]'``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

INSTALL_HINT = "pip install 'lrcomp[serve]'"

# transformers' routes that generate text; an embedding model answers them with a 400.
GENERATIVE_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/systemone",
                     "/v1/audio/transcriptions")
EMBEDDINGS_ROUTE = "/v1/embeddings"
_EMBEDDING_FIELDS = {"model", "input", "encoding_format", "dimensions", "user", "normalize"}


class ServingUnavailable(ImportError):
    """The serving packages (the ``serve`` extra) or transformers' serving module are missing."""


class OptionError(ValueError):
    """A serving option that does not fit (a bad served name, ``compile`` for an embedding model, ...)."""


def check_serving_available() -> None:
    """Raise :class:`ServingUnavailable` (with the install command) unless transformers' server can run here."""
    try:
        from transformers.utils.import_utils import is_serve_available
    except ImportError as err:
        raise ServingUnavailable(f"lrcomp serve needs transformers >= 5 with its serving extra: {INSTALL_HINT}") \
            from err
    if not is_serve_available():
        raise ServingUnavailable(f"lrcomp serve needs FastAPI, uvicorn, pydantic and openai (transformers' serving "
                                 f"extra): {INSTALL_HINT}")
    try:
        import transformers.cli.serving  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as err:
        raise ServingUnavailable(f"transformers' serving engine does not import ({err}): {INSTALL_HINT}") from err


# ---------------------------------------------------------------------------------------------- embeddings
@torch.inference_mode()
def pooled_embeddings(model: nn.Module, tokenizer, texts: list[str], *, batch_size: int = 32,
                      max_length: int = 512, normalize: bool = True) -> Tensor:
    """Sentence embeddings of ``texts``: ``[n, hidden]`` fp32 on the CPU.

    ``normalize=True`` is :func:`lrcomp.models.embed` (mean pooling of the last hidden states over the attention
    mask, then L2 normalisation); ``normalize=False`` stops before the normalisation
    (:func:`lrcomp.models.mean_pool` of the same batches). ``model`` returns ``last_hidden_state`` (a base model);
    texts are truncated to ``max_length`` tokens.
    """
    from lrcomp.models import embed, mean_pool

    if normalize:
        return embed(model, tokenizer, texts, batch_size=batch_size, max_length=max_length).cpu()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt").to(device)
        out.append(mean_pool(model(**batch).last_hidden_state, batch["attention_mask"]).cpu())  # [b, H]
    return torch.cat(out)


class RequestError(ValueError):
    """A bad embeddings request: answered with ``status`` and an OpenAI-style error body."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def _error_body(message: str, *, param: str | None = None, code: str | None = None,
                kind: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def parse_embeddings_request(body: object, served_model_name: str, hidden_size: int) -> tuple[list[str], dict]:
    """Validate an OpenAI ``/v1/embeddings`` body: ``(texts, options)`` or :class:`RequestError`.

    ``input`` is a string or a non-empty list of strings (token-id inputs are refused); ``model``, when given,
    is the served name; ``encoding_format`` is ``"float"`` (default) or ``"base64"`` (little-endian float32);
    ``dimensions``, when given, is the model's hidden size; ``normalize`` (lrcomp's, default true) a bool.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    unknown = sorted(set(body) - _EMBEDDING_FIELDS)
    if unknown:
        raise RequestError(f"unexpected fields {unknown}; accepted: {sorted(_EMBEDDING_FIELDS)}", unknown[0])
    model = body.get("model")
    if model is not None and model != served_model_name:
        raise RequestError(f"this server serves the model {served_model_name!r} only; got {model!r}", "model",
                           status=404, code="model_not_found")
    if "input" not in body:
        raise RequestError("missing field 'input': a string or a list of strings", "input")
    texts = body["input"]
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise RequestError("'input' must be a string or a non-empty list of strings", "input")
    if not all(isinstance(t, str) for t in texts):
        raise RequestError("'input' must hold strings only (token-id inputs are not supported)", "input")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise RequestError(f"'encoding_format' must be 'float' or 'base64', got {encoding!r}", "encoding_format")
    dimensions = body.get("dimensions")
    if dimensions is not None and dimensions != hidden_size:
        raise RequestError(f"'dimensions' must be the model's embedding size {hidden_size} (no truncation), got "
                           f"{dimensions!r}", "dimensions")
    normalize = body.get("normalize", True)
    if not isinstance(normalize, bool):
        raise RequestError(f"'normalize' must be true or false, got {normalize!r}", "normalize")
    return texts, {"encoding_format": encoding, "normalize": normalize}


def embeddings_response(vectors: Tensor, served_model_name: str, prompt_tokens: int, encoding_format: str) -> dict:
    """OpenAI's embeddings response for ``vectors [n, H]``: float lists, or base64 of little-endian float32."""
    data = []
    for index, vector in enumerate(vectors.to(torch.float32)):
        if encoding_format == "base64":
            value: object = base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode("ascii")
        else:
            value = vector.tolist()
        data.append({"object": "embedding", "index": index, "embedding": value})
    return {"object": "list", "data": data, "model": served_model_name,
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


# ---------------------------------------------------------------------------------------------- model kinds
def _class_names(mapping) -> set[str]:
    names: set[str] = set()
    for value in mapping.values():
        names.update(value if isinstance(value, (tuple, list)) else (value,))
    return names


def is_generative(model: nn.Module) -> bool:
    """Whether transformers' serve generates with ``model``: a causal, image-text-to-text or multimodal LM."""
    from transformers.models.auto import modeling_auto as auto

    names = set()
    for mapping in ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
                    "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES"):
        names |= _class_names(getattr(auto, mapping, {}))
    name = type(model).__name__
    return name in names or name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def _fit_tokenizer(model: nn.Module, processor) -> None:
    """Make the loaded tokenizer fit the model it serves (in place).

    A decoder whose ``forward`` takes no ``token_type_ids`` never gets them (a BERT-style tokenizer saved with a
    causal LM would otherwise break ``generate``); a tokenizer without a pad token pads with eos (else unk)."""
    import inspect

    tokenizer = getattr(processor, "tokenizer", processor)
    names = list(getattr(tokenizer, "model_input_names", []) or [])
    if "token_type_ids" in names and is_generative(model):
        if "token_type_ids" not in inspect.signature(model.forward).parameters:
            tokenizer.model_input_names = [n for n in names if n != "token_type_ids"]
    if getattr(tokenizer, "pad_token", "") is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is not None:
            tokenizer.pad_token = fallback


def served_name(folder: str | os.PathLike, name: str | None = None) -> str:
    """The model id clients send: ``name``, else the folder as given; :class:`OptionError` if transformers'
    serving cannot take it (empty, an ``@`` (read as a revision) or a ``.gguf`` ending)."""
    name = str(folder) if name is None else name
    if not name or "@" in name or name.endswith(".gguf"):
        raise OptionError(f"served model name {name!r}: a non-empty name without '@' (transformers reads '@' as a "
                          f"revision) and not ending in .gguf is needed (set one with --served-model-name)")
    return name


def _model_manager_class():
    """transformers' ``ModelManager``, pinned to one local folder served under one name, listing only it."""
    from transformers.cli.serving.model_manager import ModelManager

    class LocalModelManager(ModelManager):
        """Loads ``folder`` (through transformers' own loading code) whenever the served name is asked for;
        refuses any other model id. ``GET /v1/models`` lists the served model (not the hub cache)."""

        def __init__(self, folder: Path, served_model_name: str, **kwargs) -> None:
            self.folder = folder
            self.served_model_name = served_model_name
            self.created = int(time.time())
            super().__init__(force_model=served_model_name, **kwargs)  # loads it now, never unloads it on idle

        def load_model_and_processor(self, model_id_and_revision: str, progress_callback: Callable | None = None,
                                     tqdm_class: type | None = None, gguf_file: str | None = None):
            model_id = model_id_and_revision.split("@", 1)[0]
            if model_id != self.served_model_name or gguf_file is not None:
                raise ValueError(f"this server serves {self.served_model_name!r} (from {self.folder}) only; "
                                 f"got {model_id_and_revision!r}")
            model, processor = super().load_model_and_processor(
                f"{self.folder}@main", progress_callback=progress_callback, tqdm_class=tqdm_class)
            _fit_tokenizer(model, processor)
            return model, processor

        def get_gen_models(self, cache_dir: str | None = None) -> list[dict]:
            return [{"id": self.served_model_name, "object": "model", "created": self.created, "owned_by": "lrcomp"}]

    return LocalModelManager


# ---------------------------------------------------------------------------------------------- the app
@dataclass
class ServedModel:
    """What the server serves: ``kind`` is ``"generative"`` or ``"embedding"``."""

    served_model_name: str
    folder: Path
    architecture: str
    kind: str
    lowrank_layers: int
    hidden_size: int | None
    max_length: int | None
    chat_template: bool

    @property
    def routes(self) -> list[str]:
        """The routes this model answers (besides ``GET /health`` and ``GET /v1/models``)."""
        if self.kind == "generative":
            chat = ["POST /v1/chat/completions", "POST /v1/responses"] if self.chat_template else []
            return ["POST /v1/completions", *chat]
        return [f"POST {EMBEDDINGS_ROUTE}"]


def build_app(folder: str | os.PathLike, *, served_model_name: str | None = None, device: str = "auto",
              dtype: str = "auto", compile: bool = False, max_length: int | None = None, batch_size: int = 32):
    """transformers' serving app for the model in ``folder``, plus ``/v1/embeddings``: ``(app, ServedModel)``.

    The model is loaded now (transformers' ``ModelManager``, lrcomp's quantizer registered first).

    Args:
        folder: a local Hugging Face model folder (an lrcomp checkpoint or an ordinary one) with its tokenizer.
        served_model_name: the id clients send as ``"model"`` (default: ``str(folder)``); no ``@``.
        device: transformers' ``device_map`` (``auto``, ``cpu``, ``cuda``, ``cuda:1``).
        dtype: ``auto`` (as saved) or a torch dtype name (``float32``, ``bfloat16``, ``float16``).
        compile: transformers serve's ``--compile`` (static KV cache; transformers compiles the decode step on
            CUDA only, and lrcomp's quantizer allows it). Generative models only.
        max_length: tokens per embeddings input (truncated); default the model's positions (else 512).
        batch_size: embeddings inputs per forward.

    Raises:
        ServingUnavailable: the serving packages are missing.
        OptionError: a bad served name or option.
        OSError, ValueError, ...: transformers cannot load the folder.
    """
    check_serving_available()
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState

    from lrcomp.cli import _max_positions
    from lrcomp.integrations.hf import register
    from lrcomp.layers import LowRankLinear

    register()  # quant_method "lrcomp" (idempotent; `import lrcomp` has hooked it already)
    folder = Path(folder).expanduser()
    name = served_name(folder, served_model_name)
    if batch_size < 1 or (max_length is not None and max_length < 1):
        raise OptionError("batch_size and max_length must be positive")

    manager = _model_manager_class()(folder, name, device=device, dtype=dtype)
    model, processor = manager.load_model_and_processor(manager.process_model_name(name))
    generative = is_generative(model)
    if compile and not generative:
        manager.shutdown()
        raise OptionError(f"compile applies to text generation; {type(model).__name__} is served for embeddings")
    state = GenerationState(compile=compile)
    chat = ChatCompletionHandler(model_manager=manager, generation_state=state, chat_template_kwargs={})
    app: FastAPI = build_server(
        manager, chat,
        completion_handler=CompletionHandler(model_manager=manager, generation_state=state),
        response_handler=ResponseHandler(model_manager=manager, generation_state=state, chat_template_kwargs={}),
        transcription_handler=TranscriptionHandler(manager, state),
        systemone_handler=SystemOneHandler(model_manager=manager, generation_state=state, chat_template_kwargs={}),
        generation_state=state)

    base = getattr(model, "base_model", model)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    limit = max_length or min(_max_positions(model) or 512, 8192)
    info = ServedModel(served_model_name=name, folder=folder, architecture=type(model).__name__,
                       kind="generative" if generative else "embedding",
                       lowrank_layers=sum(isinstance(m, LowRankLinear) for m in model.modules()),
                       hidden_size=hidden, max_length=None if generative else limit,
                       chat_template=getattr(processor, "chat_template", None) is not None)
    tokenizer = getattr(processor, "tokenizer", processor)
    if not generative:
        try:  # warm-up, and a check that the model gives last_hidden_state
            hidden = pooled_embeddings(base, tokenizer, ["warm-up"], max_length=limit).shape[1]
        except (AttributeError, TypeError, ValueError) as err:
            manager.shutdown()
            raise ValueError(f"{type(model).__name__} is not a causal LM and gives no last_hidden_state to pool "
                             f"for embeddings: {err}") from err
        info.hidden_size = hidden
    app.state.lrcomp = info

    if generative:
        blocked = {EMBEDDINGS_ROUTE: f"{info.architecture} is a causal LM: use /v1/completions"
                                     + (" or /v1/chat/completions" if info.chat_template else "")}
        if not info.chat_template:
            reason = (f"the tokenizer in {folder} has no chat template: use /v1/completions, or set "
                      f"tokenizer.chat_template and save_pretrained it there")
            blocked.update({"/v1/chat/completions": reason, "/v1/responses": reason})
    else:
        blocked = dict.fromkeys(GENERATIVE_ROUTES, f"{info.architecture} is not a causal LM: it serves POST "
                                                   f"{EMBEDDINGS_ROUTE}")

    @app.middleware("http")
    async def _route_guard(request, call_next):
        """Routes this model cannot answer: a 400 with a JSON error (why), before any handler runs."""
        path = request.url.path.rstrip("/")
        if path in blocked:
            return JSONResponse(_error_body(f"{path} is not served: {blocked[path]}"), status_code=400)
        return await call_next(request)

    @app.exception_handler(Exception)
    async def _internal_error(request, exc: Exception):
        """An unexpected failure in a handler: a JSON 500 (uvicorn logs the traceback; the server goes on)."""
        return JSONResponse(_error_body(f"{type(exc).__name__}: {exc}", kind="server_error"), status_code=500)

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lrcomp-embed")  # one forward at a time

    async def embeddings(request):
        """OpenAI ``POST /v1/embeddings``: pooled last hidden states of the served encoder (a plain Starlette
        endpoint: the body is parsed here, so that every bad request gets OpenAI's error shape)."""
        try:
            try:
                body = json.loads(await request.body() or b"null")
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise RequestError(f"the request body is not JSON: {err}") from err
            texts, options = parse_embeddings_request(body, name, info.hidden_size)
        except RequestError as err:
            return JSONResponse(_error_body(str(err), param=err.param, code=err.code), status_code=err.status)

        def run() -> tuple[Tensor, int]:
            model_now, processor_now = manager.load_model_and_processor(manager.process_model_name(name))
            tok = getattr(processor_now, "tokenizer", processor_now)
            counts = tok(texts, truncation=True, max_length=limit)["input_ids"]
            vectors = pooled_embeddings(getattr(model_now, "base_model", model_now), tok, texts,
                                        batch_size=batch_size, max_length=limit, normalize=options["normalize"])
            return vectors, sum(len(ids) for ids in counts)

        try:
            vectors, tokens = await asyncio.get_running_loop().run_in_executor(executor, run)
        except Exception as err:  # the model failed: a JSON 500, the server keeps running
            return JSONResponse(_error_body(f"{type(err).__name__}: {err}", kind="server_error"), status_code=500)
        return JSONResponse(embeddings_response(vectors, name, tokens, options["encoding_format"]))

    app.router.add_route(EMBEDDINGS_ROUTE, embeddings, methods=["POST"])
    return app, info


# ---------------------------------------------------------------------------------------------- the server
def listen_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``(host, port)`` (port 0: a free one), for uvicorn to serve on; OSError if taken.

    It listens at once: a client that connects before uvicorn has started waits in the backlog."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


class LocalServer:
    """The app under uvicorn on an already bound socket: :meth:`run` blocks (Ctrl-C stops it); :meth:`start`
    and :meth:`stop` run it on a background thread (tests, notebooks)."""

    def __init__(self, app, info: ServedModel, sock: socket.socket, *, quiet: bool = False) -> None:
        import copy

        import uvicorn
        from uvicorn.config import LOGGING_CONFIG

        self.app, self.info, self.socket = app, info, sock
        self.host, self.port = sock.getsockname()[:2]
        log_config = copy.deepcopy(LOGGING_CONFIG)
        log_config["handlers"]["access"]["stream"] = "ext://sys.stderr"  # stdout is for the URL only
        config = uvicorn.Config(app, log_level="warning" if quiet else "info", access_log=not quiet,
                                log_config=log_config, lifespan="on", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """``http://host:port`` (IPv6 hosts in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def run(self) -> None:
        """Serve until interrupted (uvicorn handles SIGINT / SIGTERM in the main thread), then close."""
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.socket.close()

    def start(self, timeout: float = 60.0) -> LocalServer:
        """Serve on a daemon thread; return once uvicorn accepts connections (RuntimeError if it does not)."""
        self._thread = threading.Thread(target=self.run, name="lrcomp-serve", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server on {self.url} did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Ask uvicorn to exit and wait for the thread (the model manager frees the model on shutdown)."""
        self.server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with contextlib.suppress(OSError):
            self.socket.close()

    def describe(self) -> str:
        """One line: the model, its low-rank layers, the served name, the URL and the routes."""
        info = self.info
        layers = f"{info.lowrank_layers} low-rank layers" if info.lowrank_layers else "no low-rank layers"
        return (f"serving {info.architecture} ({layers}) from {info.folder} as model {info.served_model_name!r} "
                f"on {self.url}: {', '.join(info.routes)}, GET /v1/models, GET /health")


__all__ = ["INSTALL_HINT", "LocalServer", "OptionError", "ServedModel", "ServingUnavailable", "build_app",
           "check_serving_available", "embeddings_response", "is_generative", "listen_socket",
           "parse_embeddings_request", "pooled_embeddings", "served_name"]
