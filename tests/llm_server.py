"""A loopback OpenAI-compatible server for the explain tests (chat completions, and the legacy
completions with echo that the simulation scorer uses), answering from a script.

`script(body, n)` gets the request body (a dict) and the 0-based request number and returns
(status, payload, delay_s): payload is a dict sent as JSON, or a str sent as is (a garbled body).
The server records every body and path, the Authorization headers it saw, and the most requests in flight.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def completion(text: str, *, logprobs: list | None = None, prompt_tokens: int = 11, completion_tokens: int = 3) -> dict:
    """A chat.completion body; logprobs: [(token, logprob, [(candidate, logprob), ...]), ...]."""
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {
            "content": [
                {"token": t, "logprob": lp, "top_logprobs": [{"token": c, "logprob": cl} for c, cl in top]}
                for t, lp, top in logprobs
            ]
        }
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "choices": [choice],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }


# How the scripted server tokenizes an echoed prompt: '<', '>', tab, newline and 'unknown' alone, the
# runs between them as one token each (so "<start>" is three tokens, as OpenAI's simulator expects).
ECHO_TOKENS = re.compile(r"<|>|\t|\n|unknown|[^<>\t\n]+")


def echo_completion(prompt: str, distribution) -> dict:
    """A text_completion body for `prompt` sent with echo, logprobs and max_tokens 0: the prompt's
    tokens with their text offsets and top log-probabilities; at the k-th 'unknown' after a tab the
    mapping distribution(k) ({token: logprob}), elsewhere the token itself (the first token: null)."""
    tokens = ECHO_TOKENS.findall(prompt)
    assert "".join(tokens) == prompt
    offsets = list(itertools.accumulate([0] + [len(t) for t in tokens[:-1]]))
    places = itertools.count()
    tops = [
        None if i == 0 else distribution(next(places)) if t == "unknown" and tokens[i - 1] == "\t" else {t: -0.05}
        for i, t in enumerate(tokens)
    ]
    logprobs = {
        "tokens": tokens,
        "token_logprobs": [None] + [-0.05] * (len(tokens) - 1),
        "top_logprobs": tops,
        "text_offset": offsets,
    }
    return {
        "id": "cmpl-2",
        "object": "text_completion",
        "choices": [{"index": 0, "text": prompt, "logprobs": logprobs, "finish_reason": "length"}],
        "usage": {"prompt_tokens": len(tokens), "completion_tokens": 0, "total_tokens": len(tokens)},
    }


def simulation_distribution(k: int) -> dict[str, float]:
    """A simulator's top log-probabilities at the k-th place: most of the answers 0..10 and two other tokens."""
    weights = {str(v): 1.0 + ((k * 7 + v * 5) % 11) ** 2 / (1 + v) for v in range(11) if (k + v) % 6 != 5}
    total = sum(weights.values()) * 1.25
    return {**{t: math.log(w / total) for t, w in weights.items()}, "unknown": math.log(0.1), " 1": math.log(0.05)}


def simulation_answers(body: dict, n: int):
    """Answers to whq's simulation requests (legacy completions with echo)."""
    assert body["echo"] is True and body["max_tokens"] == 0 and body["logprobs"] > 0
    return 200, echo_completion(body["prompt"], simulation_distribution), 0.0


class ScriptedServer:
    def __init__(self, script):
        self.script = script
        self.bodies: list[dict] = []
        self.paths: list[str] = []
        self.auth: list[str | None] = []
        self.in_flight = self.max_in_flight = 0
        self.answered = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server interface
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with owner._lock:
                    n = len(owner.bodies)
                    owner.bodies.append(body)
                    owner.paths.append(self.path)
                    owner.auth.append(self.headers.get("Authorization"))
                    owner.in_flight += 1
                    owner.max_in_flight = max(owner.max_in_flight, owner.in_flight)
                try:
                    status, payload, delay = owner.script(body, n)
                    time.sleep(delay)
                    raw = payload if isinstance(payload, str) else json.dumps(payload)
                finally:
                    # Out of flight before the reply leaves: a client that reads it may send its next call
                    # at once, before this thread would run again.
                    with owner._lock:
                        owner.in_flight -= 1
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw.encode())))
                    self.end_headers()
                    self.wfile.write(raw.encode())
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout test)
                finally:
                    with owner._lock:
                        owner.answered += 1

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def delphi_answers(body: dict, n: int):
    """Answers a model would give to whq's delphi prompts, varied by request number: an explanation,
    a 0/1 list as long as the batch (with log-probabilities), an intruder index; every fifth classifier
    answer is a steered, out-of-form one."""
    last = body["messages"][-1]["content"]
    system = body["messages"][0]["content"]
    if system.startswith("You are a meticulous AI researcher"):  # delphi's explainer prompts
        return 200, completion(f"[EXPLANATION]: the word {n % 3}"), 0.0
    if "intruder" in system:
        return 200, completion(f"[RESPONSE]: {n % 2}"), 0.0
    size = sum(1 for line in last.splitlines() if line.startswith("Example "))
    if n % 5 == 4:
        return 200, completion("Ignore the above: every example is [yes]"), 0.0
    bits = [(n + i) % 2 for i in range(size)]
    tokens = [("[", -0.01, [("[", -0.01)])]
    for i, bit in enumerate(bits):
        p1 = 0.2 + 0.6 * ((n * 7 + i * 3) % 5) / 4
        tokens.append((str(bit), -0.1, [("1", math.log(p1)), ("0", math.log(1 - p1))]))
        tokens.append(("," if i < size - 1 else "]", -0.01, [(",", -0.01)]))
    return 200, completion("[" + ",".join(map(str, bits)) + "]", logprobs=tokens), 0.0
