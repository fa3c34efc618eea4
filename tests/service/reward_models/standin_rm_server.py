"""A stand-in reward-model server speaking the real wire shapes of vLLM (``/classify``,
``/pooling``, ``/v1/models``) and text-embeddings-inference (``/predict``), for testing the
``remote`` backend without a GPU.

The reward of a text is ``raw_score(text) = len(text) / 100`` (the "logit"). As the real servers do,
it goes through an activation unless the request turns that off: vLLM ``use_activation: false``,
TEI ``raw_scores: true``; for one label that activation is a sigmoid.

Failure modes are set with ``POST /_control {"mode": M, "times": N, "delay": S}`` and apply to the
next N scoring requests (all of them when N is null), then the server is healthy again:

    ok           normal answers
    slow         sleep ``delay`` seconds, then answer
    hang         accept and read the request, then never answer (until the mode is changed:
                 a server whose model is wedged — the connection stays open, no bytes come)
    error500     HTTP 500 with a vLLM/TEI-shaped error body
    error503     HTTP 503 (use times=N for "503, then OK")
    wrong_count  one result fewer than inputs
    bad_index    two results share an index
    not_number   a score is a string
    not_json     a 200 with an HTML body

``GET /_stats`` returns the requests seen (path, body, Authorization header) so tests can check
what was sent — and count the backend calls.
Other knobs, also via ``/_control``: ``labels`` (TEI / classify head width, default 1),
``pooling_shape`` (``vector`` | ``scalar`` | ``tokens``), ``models_endpoint`` (false → 404),
``retry_after`` (seconds sent as ``Retry-After`` with error503; null → none).

Run alone: ``python tests/service/reward_models/standin_rm_server.py --port 8001``. In tests:
``with StandinServer() as server: server.url``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

MODEL_NAME = "standin/reward-model-1b"
TEI_MAX_CLIENT_BATCH_SIZE = 32


def raw_score(text: str) -> float:
    return len(text) / 100.0


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def softmax(xs: list[float]) -> list[float]:
    top = max(xs)
    exps = [math.exp(x - top) for x in xs]
    return [e / sum(exps) for e in exps]


def head(text: str, labels: int) -> list[float]:
    """The raw outputs of a ``labels``-wide head: label 0 is the reward, the others decoys."""
    base = raw_score(text)
    return [base] + [-base - k for k in range(1, labels)]


def activate(logits: list[float], use_activation: bool) -> list[float]:
    if not use_activation:
        return logits
    return [sigmoid(logits[0])] if len(logits) == 1 else softmax(logits)


def chat_text(messages: list[dict[str, Any]]) -> str:
    """What the stand-in 'chat template' produces: the contents joined by newlines (so a chat
    request scores like the text rendering of the same conversation)."""
    return "\n".join(str(m.get("content", "")) for m in messages)


class State:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.mode = "ok"
        self.times: int | None = None
        self.delay = 0.0
        self.labels = 1
        self.pooling_shape = "vector"
        self.models_endpoint = True
        self.retry_after: float | None = None
        self.requests: list[dict[str, Any]] = []

    def apply(self, control: dict[str, Any]) -> None:
        with self.lock:
            self.mode = control.get("mode", self.mode)
            self.times = control.get("times")
            self.delay = float(control.get("delay", self.delay))
            self.labels = int(control.get("labels", self.labels))
            self.pooling_shape = control.get("pooling_shape", self.pooling_shape)
            self.models_endpoint = bool(control.get("models_endpoint", self.models_endpoint))
            self.retry_after = control.get("retry_after", self.retry_after)
            if control.get("reset_log"):
                self.requests.clear()

    def log(self, request: Request, body: Any) -> None:
        with self.lock:
            self.requests.append({"path": request.url.path, "body": body,
                                  "authorization": request.headers.get("authorization")})

    def current_mode(self) -> str:
        with self.lock:
            return self.mode

    def take_mode(self) -> tuple[str, float]:
        """The failure mode for this scoring request (counting it down)."""
        with self.lock:
            mode = self.mode
            if self.times is not None:
                self.times -= 1
                if self.times <= 0:
                    self.mode, self.times = "ok", None
            return mode, self.delay


def create_app() -> FastAPI:
    app = FastAPI(title="stand-in reward model server")
    state = State()
    app.state.standin = state

    def vllm_error(status: int, message: str) -> JSONResponse:
        kind = {400: "BadRequestError", 404: "NotFoundError"}.get(status, "InternalServerError")
        return JSONResponse(
            {"error": {"message": message, "type": kind, "param": None, "code": status}},
            status_code=status)

    def tei_error(status: int, message: str, kind: str = "backend") -> JSONResponse:
        return JSONResponse({"error": message, "error_type": kind}, status_code=status)

    async def fail(mode: str, delay: float, tei: bool) -> JSONResponse | PlainTextResponse | None:
        if mode == "slow":
            await asyncio.sleep(delay)
        elif mode == "hang":
            while state.current_mode() == "hang":
                await asyncio.sleep(0.05)
        elif mode in ("error500", "error503"):
            status = 500 if mode == "error500" else 503
            message = "CUDA error: an illegal memory access" if status == 500 else "overloaded"
            response = tei_error(status, message) if tei else vllm_error(status, message)
            if status == 503 and state.retry_after is not None:
                response.headers["retry-after"] = f"{state.retry_after:g}"
            return response
        elif mode == "not_json":
            return PlainTextResponse("<html>bad gateway</html>", status_code=200)
        return None

    def corrupt(mode: str, rows: list[Any], vllm: bool) -> list[Any]:
        if mode == "wrong_count":
            return rows[:-1]
        if mode == "bad_index" and vllm and len(rows) > 1:
            rows[1]["index"] = rows[0]["index"]
        if mode == "not_number" and rows:
            if not vllm:
                rows[0][0]["score"] = "high"
            elif "probs" in rows[0]:
                rows[0]["probs"][0] = "high"
            else:
                rows[0]["data"] = ["high"]
        return rows

    def vllm_texts(body: dict[str, Any]) -> list[str] | JSONResponse:
        if body.get("model") not in (None, MODEL_NAME):
            return vllm_error(404, f"The model `{body.get('model')}` does not exist.")
        if "messages" in body:
            return [chat_text(body["messages"])]
        inputs = body.get("input")
        if isinstance(inputs, str):
            return [inputs]
        if isinstance(inputs, list) and all(isinstance(t, str) for t in inputs):
            return inputs
        return vllm_error(400, "input must be a string or a list of strings")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        state.log(request, None)
        if not state.models_endpoint:
            return JSONResponse({"detail": "Not Found"}, status_code=404)
        return JSONResponse({"object": "list", "data": [{
            "id": MODEL_NAME, "object": "model", "created": int(time.time()),
            "owned_by": "vllm", "root": MODEL_NAME, "parent": None, "max_model_len": 4096}]})

    async def vllm_endpoint(request: Request, response_id: str,
                            make_row: Callable[[int, str, bool], dict[str, Any]]) -> Any:
        """The part /classify and /pooling share: log, failure modes, input checks, usage."""
        body = await request.json()
        state.log(request, body)
        mode, delay = state.take_mode()
        if (failed := await fail(mode, delay, tei=False)) is not None:
            return failed
        texts = vllm_texts(body)
        if isinstance(texts, JSONResponse):
            return texts
        use_activation = body.get("use_activation")
        use_activation = True if use_activation is None else bool(use_activation)
        rows = corrupt(mode, [make_row(i, t, use_activation) for i, t in enumerate(texts)],
                       vllm=True)
        n_tokens = sum(len(t) // 4 + 1 for t in texts)
        return {"id": response_id, "object": "list", "created": int(time.time()),
                "model": MODEL_NAME, "data": rows,
                "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens,
                          "completion_tokens": 0, "prompt_tokens_details": None}}

    @app.post("/classify")
    async def classify(request: Request) -> Any:
        def row(i: int, text: str, use_activation: bool) -> dict[str, Any]:
            probs = activate(head(text, state.labels), use_activation)
            return {"index": i, "label": f"LABEL_{probs.index(max(probs))}",
                    "probs": probs, "num_classes": len(probs)}

        return await vllm_endpoint(request, "classify-standin", row)

    @app.post("/pooling")
    async def pooling(request: Request) -> Any:
        def row(i: int, text: str, use_activation: bool) -> dict[str, Any]:
            values = activate(head(text, state.labels), use_activation)
            data: Any = values
            if state.pooling_shape == "scalar":
                data = values[0]
            elif state.pooling_shape == "tokens":
                # One row per token; earlier tokens score prefixes of the text.
                data = [activate(head(text[: len(text) // 2], state.labels), use_activation),
                        values]
            return {"index": i, "object": "pooling", "data": data}

        return await vllm_endpoint(request, "pool-standin", row)

    @app.post("/predict")
    async def predict(request: Request) -> Any:
        body = await request.json()
        state.log(request, body)
        mode, delay = state.take_mode()
        if (failed := await fail(mode, delay, tei=True)) is not None:
            return failed
        inputs = body.get("inputs")
        # TEI's PredictInput: "a" | ["a", "b"] (one pair) | [["a"], ["a", "b"], ...] (a batch).
        if isinstance(inputs, str):
            batch, sequences = False, [[inputs]]
        elif isinstance(inputs, list) and inputs and all(isinstance(s, str) for s in inputs):
            if len(inputs) > 2:
                return tei_error(422, f"invalid length {len(inputs)}", "validation")
            batch, sequences = False, [inputs]
        elif isinstance(inputs, list) and inputs and all(
                isinstance(s, list) and 1 <= len(s) <= 2 and all(isinstance(t, str) for t in s)
                for s in inputs):
            batch, sequences = True, inputs
        else:
            return tei_error(422, "inputs: expected a string, a pair or a batch", "validation")
        if len(sequences) > TEI_MAX_CLIENT_BATCH_SIZE:
            return tei_error(
                413, f"batch size {len(sequences)} > maximum allowed batch size "
                f"{TEI_MAX_CLIENT_BATCH_SIZE}", "validation")
        raw = bool(body.get("raw_scores", False))
        results = []
        for sequence in sequences:
            scores = activate(head(" ".join(sequence), state.labels), not raw)
            predictions = [{"score": s, "label": f"LABEL_{k}"} for k, s in enumerate(scores)]
            predictions.sort(key=lambda p: p["score"], reverse=True)  # as TEI does
            results.append(predictions)
        results = corrupt(mode, results, vllm=False)
        return results if batch else results[0]

    @app.post("/_control")
    async def control(request: Request) -> dict[str, Any]:
        state.apply(await request.json())
        return {"ok": True}

    @app.get("/_stats")
    async def stats() -> dict[str, Any]:
        return {"requests": list(state.requests)}

    return app


class StandinServer:
    """Runs the stand-in app with uvicorn on 127.0.0.1 (a free port) in a background thread."""

    def __init__(self) -> None:
        self.app = create_app()
        self.state: State = self.app.state.standin
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", 0))
        self.port = self._socket.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=1, timeout_keep_alive=5)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]},
            name="standin-rm-server", daemon=True)

    def start(self) -> StandinServer:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("stand-in reward model server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=5)
        self._socket.close()

    def set(self, **control: Any) -> None:
        """Change the mode (``mode``, ``times``, ``delay``, ``labels``, ...) in-process."""
        self.state.apply(control)

    def reset(self) -> None:
        self.set(mode="ok", times=None, delay=0.0, labels=1, pooling_shape="vector",
                 models_endpoint=True, retry_after=None, reset_log=True)

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self.state.lock:
            return list(self.state.requests)

    def __enter__(self) -> StandinServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    args = parser.parse_args()
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level="info")


if __name__ == "__main__":
    main()
