"""The naive per-sample reward server the benchmark compares against: the OpenRLHF remote-RM
pattern (``openrlhf/cli/serve_rm.py``: an ``async def /get_reward`` handler that calls the model
synchronously), one request per response.

* RM: the *same* backend as the service (``load_reward_model``: the embedded MiniLM by default,
  or ``hf:PATH``), the same ``encode`` (same truncation, same text), ``forward`` on a batch of ONE,
  inside the request handler.
* Verifier: ``math_verify.parse``/``verify`` in-process, inside the request handler, with the same
  reference handling as the service's worker (bare LaTeX wrapped in ``$...$``).

Timeout choice: math-verify's timeouts use ``signal.alarm``, which works only in the main thread.
The handler does run in uvicorn's main thread (``async def``, blocking the event loop exactly as
OpenRLHF's server does), but a SIGALRM landing in an event loop interrupts whatever happens to be
running, so — like TRL's ``accuracy_reward`` off the main thread — timeouts are DISABLED
(``parsing_timeout=None``, ``timeout_seconds=None``). That is the fastest option (no alarm
syscalls), so it favours the naive server; the price is that one pathological answer can hang
it, which the service's worker pool with hard timeouts exists to prevent.

Run: ``python bench/naive_server.py --host 127.0.0.1 --port 8100 [--reward-model embedded]``."""

import argparse
import logging
import os

from fastapi import FastAPI, Request  # module level: FastAPI resolves handler annotations here
from fastapi.responses import JSONResponse

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _verify(reference: str | None, response: str) -> bool:
    from math_verify import parse, verify

    if not reference:
        return False
    text = reference.strip()
    candidates = [text] if ("$" in text or "\\boxed" in text) else [f"${text}$", text]
    gold: list = []
    for candidate in candidates:
        gold = parse(candidate, parsing_timeout=None)  # type: ignore[arg-type]
        if gold:
            break
    if not gold:
        return False
    predicted = parse(response, parsing_timeout=None)  # type: ignore[arg-type]
    if not predicted:
        return False
    return bool(verify(gold, predicted, timeout_seconds=None))  # type: ignore[arg-type]


def build_app(reward_model: str = "embedded", device: str = "auto", dtype: str = "auto") -> FastAPI:
    from hero_service.reward_models import ScoringItem, load_reward_model

    logging.getLogger("math_verify.parser").setLevel(logging.ERROR)
    logging.getLogger("math_verify.grader").setLevel(logging.ERROR)
    model = load_reward_model(reward_model, device=device, dtype=dtype)
    app = FastAPI(title="naive per-sample reward server (benchmark baseline)")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        data = await request.json()
        queries: list[str] = data["query"]
        prompts = data.get("prompts") or [""] * len(queries)
        labels = data.get("labels") or [None] * len(queries)
        rewards, scores, verified = [], [], []
        for query, prompt, label in zip(queries, prompts, labels):
            response = query[len(prompt):] if prompt and query.startswith(prompt) else query
            encoded = model.encode([ScoringItem(prompt, response, label)])
            score = float(model.forward(encoded)[0])  # batch of one, in the handler
            ok = _verify(label, response)
            verified.append(float(ok))
            scores.append(score)
            rewards.append(float(ok) + 0.1 * score)  # any combination: throughput is the point
        return JSONResponse({"rewards": rewards, "scores": rewards,
                             "extra_logs": {"verified": verified, "rm_score": scores}})

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8100)
    parser.add_argument("--reward-model", default="embedded")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    app = build_app(args.reward_model, args.device, args.dtype)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
