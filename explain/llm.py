"""Language-model calls: one request form, three backends, and one caller that caches every call.

A `Request` is the whole question (model, messages, sampling settings, seed); its sha256 over
canonical JSON is the key of the model-call cache (table model_calls). `Caller.call` answers
from the cache when it can and otherwise sends the request through a backend, retrying 429s,
5xx answers, timeouts and garbled bodies with exponential backoff, and appends the answer to the
cache journal before handing it back, so a killed run loses no call it paid for.

Backends:
  openai:URL:MODEL   any OpenAI-compatible server (vLLM, llama.cpp, Ollama, a hosted API): POST
                     URL/chat/completions with logprobs/top_logprobs; httpx when installed, else urllib.
                     A forced answer (simulation) goes to the legacy URL/completions with echo, logprobs
                     and max_tokens 0, which returns the prompt's own log-probabilities (OpenAI's
                     simulator did the same)
  hf:PATH|config:X   a local Hugging Face causal LM in this process (CPU or CUDA); log-probabilities
                     from its logits; torch is imported only here
  top-tokens         no model at all (the deterministic explainer; scorers refuse it)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from warehouse.errors import BadInput, WarehouseError

NO_MODEL = "top-tokens"
RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
TOP_LOGPROBS = 5  # delphi asks for 5 (scorers/classifier/classifier.py)
ECHO_LOGPROBS = 15  # OpenAI's simulator asks for 15 at each prompt token (explanations/simulator.py)
MAX_REPLY = 64 * 2**20  # bytes: an echoed prompt's 15 log-probabilities a token fit many times over
PLACEHOLDER = "unknown"  # what OpenAI's simulator writes where it reads the distribution over 0..10


class LLMUnavailable(WarehouseError):
    """The model server kept failing after every retry (the calls already answered stay cached)."""


class BudgetSpent(WarehouseError):
    """--max-calls was reached (the calls made are cached: resume with a larger budget)."""


class Retryable(Exception):
    """A failure worth another try: a 429, a 5xx, a timeout, a body that is not the expected JSON."""


def canonical_json(body) -> str:
    """A request's text, the one its key hashes."""
    return json.dumps(body, sort_keys=True, ensure_ascii=False)


@dataclasses.dataclass(frozen=True)
class Request:
    model: str
    messages: tuple[tuple[str, str], ...]  # (role, content)
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int = 0
    logprobs: bool = False
    top_logprobs: int = 0
    # Simulation reads the distribution over answers at marked places of a forced answer instead of
    # generating one (OpenAI's "all at once" simulator); `forced` is that answer, `marker` the place.
    forced: str | None = None
    marker: str | None = None

    # Both are cached: a request's key is asked for at every step of its way (plan, cache, caller, commit).
    @functools.cached_property
    def _canonical(self) -> str:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        body["messages"] = [{"role": r, "content": c} for r, c in self.messages]
        return canonical_json(body)

    def canonical(self) -> str:
        return self._canonical

    @functools.cached_property
    def key(self) -> str:
        return hashlib.sha256(self._canonical.encode()).hexdigest()

    def text(self) -> str:
        return "\n".join(c for _, c in self.messages) + (self.forced or "")


def messages(pairs: list[dict]) -> tuple[tuple[str, str], ...]:
    return tuple((m["role"], m["content"]) for m in pairs)


@dataclasses.dataclass
class Answer:
    """A model's answer: text, and where returned the log-probabilities of each generated token
    (token, logprob, top: [[token, logprob], ...]), or for a forced answer the distributions at its
    markers (`marks`: one {answer: logprob} per marker)."""

    text: str
    tokens: list | None = None
    marks: list | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    cached: bool = False

    def to_json(self) -> str:
        return json.dumps({"text": self.text, "tokens": self.tokens, "marks": self.marks}, ensure_ascii=False)

    @classmethod
    def from_json(cls, payload: str, **counts) -> Answer:
        return cls.from_body(json.loads(payload), **counts)

    @classmethod
    def from_body(cls, body: dict, **counts) -> Answer:
        return cls(text=body["text"], tokens=body.get("tokens"), marks=body.get("marks"), **counts)


# -- backends ---------------------------------------------------------------------------
class OpenAIBackend:
    """Chat completions on any OpenAI-compatible server; forced answers through its completions endpoint."""

    max_in_flight = None  # the server decides how many it answers at once

    def __init__(self, base_url: str, model: str, api_key: str | None, timeout: float):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.completions_url = base_url.rstrip("/") + "/completions"
        self.model, self.timeout = model, timeout
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        try:
            import httpx

            self._client = httpx.Client(timeout=timeout)
        except ImportError:
            self._client = None

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)  # a remote model's tokenizer is unknown: about 4 characters a token

    def send(self, request: Request) -> Answer:
        if request.forced is not None:
            return self._forced(request)
        body = {
            "model": self.model,
            "messages": [{"role": r, "content": c} for r, c in request.messages],
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "seed": request.seed,
        }
        if request.logprobs:
            body.update(logprobs=True, top_logprobs=request.top_logprobs)
        raw, latency = self._exchange(self.url, body, "check the URL, the model name and the API key variable")
        try:
            reply = _loads(raw)
            choice = reply["choices"][0]
            text = choice["message"]["content"] or ""
            if not isinstance(text, str):
                raise TypeError("content is not text")
            tokens = None
            content = (choice.get("logprobs") or {}).get("content")
            if content:
                tokens = [
                    [
                        t["token"],
                        _logprob(t["logprob"]),
                        [[c["token"], _logprob(c["logprob"])] for c in t["top_logprobs"]],
                    ]
                    for t in content
                ]
            usage = reply.get("usage") or {}
            prompt_tokens = _count(usage.get("prompt_tokens") or 0)
            completion_tokens = _count(usage.get("completion_tokens") or 0)
        except (ValueError, KeyError, IndexError, TypeError, OverflowError) as err:
            raise Retryable(f"a reply that is not a chat completion ({err})") from None
        return Answer(text, tokens, None, prompt_tokens, completion_tokens, latency)

    def _exchange(self, url: str, body: dict, fix: str) -> tuple[str, float]:
        """The reply's body and the call's seconds; a failure worth retrying raises Retryable."""
        started = time.perf_counter()
        status, raw = self._post(url, json.dumps(body).encode())
        latency = time.perf_counter() - started
        if status in RETRY_STATUS or status >= 500:
            raise Retryable(f"HTTP {status}")
        if status != 200:
            raise LLMUnavailable(f"the model server at {url} answered HTTP {status} ({raw[:120]!r}): {fix}")
        return raw, latency

    def _forced(self, request: Request) -> Answer:
        """The prompt as plain text (the messages joined by blank lines, as HFBackend does without a chat
        template) followed by the forced answer with PLACEHOLDER at each marker, sent to the completions
        endpoint with echo and max_tokens 0: the server scores the prompt and returns, for each of its
        tokens, the top log-probabilities of the token at that place. At each placeholder (found by its
        character offset) they are the model's distribution over what it would write there."""
        prefix = "\n\n".join(c for _, c in request.messages) + "\n\n"
        pieces = request.forced.split(request.marker)
        prompt, places = prefix, []
        for i, piece in enumerate(pieces):
            prompt += piece
            if i < len(pieces) - 1:
                places.append(len(prompt))
                prompt += PLACEHOLDER
        body = {
            "model": self.model,
            "prompt": prompt,
            "max_tokens": 0,
            "echo": True,
            "logprobs": ECHO_LOGPROBS,
            "temperature": request.temperature,
            "seed": request.seed,
        }
        raw, latency = self._exchange(
            self.completions_url,
            body,
            "the simulation scorer needs a server whose completions endpoint returns the prompt's log-probabilities "
            "(echo with logprobs and max_tokens 0: vLLM, llama.cpp); else score simulation with an hf: model",
        )
        try:
            reply = _loads(raw)
            logprobs = reply["choices"][0]["logprobs"]
            offsets, tops = logprobs["text_offset"], logprobs["top_logprobs"]
            if len(offsets) != len(tops):
                raise ValueError("text_offset and top_logprobs differ in length")
            at = {int(offset): i for i, offset in enumerate(offsets)}
            marks = []
            for place in places:
                i = at.get(place)
                if i is None:  # the placeholder did not start a token: this answer is out of form
                    marks = []
                    break
                marks.append(_distribution(tops[i]))
            usage = reply.get("usage") or {}
            prompt_tokens = _count(usage.get("prompt_tokens") or len(offsets))
        except (ValueError, KeyError, IndexError, TypeError, OverflowError) as err:
            raise Retryable(f"a reply that is not a completion with prompt log-probabilities ({err})") from None
        return Answer("", None, marks, prompt_tokens, 0, latency)

    def _post(self, url: str, payload: bytes) -> tuple[int, str]:
        deadline = time.perf_counter() + self.timeout
        if self._client is not None:
            import httpx

            try:
                with self._client.stream("POST", url, content=payload, headers=self._headers) as reply:
                    return reply.status_code, _read_by(reply.iter_bytes(), deadline)
            except httpx.TimeoutException:
                raise Retryable("timed out") from None
            except httpx.TransportError as err:
                raise Retryable(f"connection failed ({err})") from None
        import urllib.error
        import urllib.request

        req = urllib.request.Request(url, data=payload, headers=self._headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as reply:
                return reply.status, _read_by(iter(functools.partial(reply.read1, 65536), b""), deadline)
        except urllib.error.HTTPError as err:
            return err.code, _read_by(iter(functools.partial(err.read1, 65536), b""), deadline)
        except TimeoutError:
            raise Retryable("timed out") from None
        except urllib.error.URLError as err:
            raise Retryable(f"connection failed ({err.reason})") from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _loads(raw: str):
    """A reply's JSON, with a lone surrogate escape (\\ud800 unpaired, which a server may send for a
    token cut inside a character) read as U+FFFD: no UTF-8 file (the journal, a part) can hold it."""
    reply = json.loads(raw)
    if _SURROGATE_ESCAPE.search(raw):
        text = json.dumps(reply, ensure_ascii=False)
        reply = json.loads(text.encode("utf-16", "surrogatepass").decode("utf-16", "replace"))
    return reply


def _read_by(chunks, deadline: float) -> str:
    """A reply's body, read whole by `deadline` (the clients' timeouts bound each read, so a server
    sending a byte a second would hold a call for ever) and at most MAX_REPLY bytes (held in memory)."""
    body = bytearray()
    for chunk in chunks:
        body += chunk
        if len(body) > MAX_REPLY:
            raise Retryable(f"a reply over {MAX_REPLY // 2**20} MiB")
        if time.perf_counter() > deadline:
            raise Retryable("timed out")
    return body.decode("utf-8", "replace")


def _distribution(top) -> dict[str, float]:
    """A prompt token's top log-probabilities as {token: logprob}: OpenAI and vLLM send a mapping,
    some servers a list of {token, logprob}; the first token has none (null)."""
    if top is None:
        return {}
    if isinstance(top, dict):
        return {str(k): _logprob(v) for k, v in top.items()}
    return {str(t["token"]): _logprob(t["logprob"]) for t in top}


def _logprob(value) -> float:
    """A server's log-probability: a finite number at most 0 (NaN, infinities and positive values, which
    no probability has, would turn every metric computed from it into NaN or an overflow)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"a log-probability that is not a number ({str(value)[:20]!r})")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not -math.inf < number <= 0:
        raise ValueError(f"a log-probability of {number} (not a finite number at most 0)")
    return number


def _count(value) -> int:
    """A server's token count, stored as a 32-bit integer."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**31 - 1:
        raise ValueError(f"a token count of {str(value)[:20]} (not a whole number from 0 to 2**31 - 1)")
    return value


class HFBackend:
    """A local causal LM in this process: greedy decoding, log-probabilities from the logits."""

    # One forward at a time: more calls in flight only make threads contend for the cores (measured:
    # simulation on the tiny model took 1.6x the time with 4 in flight).
    max_in_flight = 1

    def __init__(self, spec: str, device: str = "cpu"):
        import torch
        from transformers.utils import logging

        logging.disable_progress_bar()
        self.torch = torch
        self.device = device
        if spec.startswith("config:"):
            from ingest.models import load  # the random tiny models ingest builds offline

            loaded = load(spec, device="cpu")
            self.model, self.tokenizer = loaded.model, loaded.hf_tokenizer
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=True)
                self.model = AutoModelForCausalLM.from_pretrained(spec, local_files_only=True)
            except (OSError, ValueError) as err:
                raise BadInput(
                    f"cannot load a causal LM from {spec!r} ({str(err).splitlines()[0][:120]}): give a local "
                    f"Hugging Face folder or config:qwen3-tiny"
                ) from None
        self.model.to(device).eval()
        import inspect

        # transformers 5 renamed past_key_values to cache; older releases and custom models keep the old name
        self._cache_arg = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._lock = threading.Lock()  # one forward at a time: concurrency is for remote servers

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _prompt_ids(self, request: Request) -> list[int]:
        chat = [{"role": r, "content": c} for r, c in request.messages]
        if getattr(self.tokenizer, "chat_template", None):
            ids = self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        text = "\n\n".join(c for _, c in request.messages) + "\n\n"
        return self.tokenizer(text)["input_ids"]

    def send(self, request: Request) -> Answer:
        torch = self.torch
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            ids = self._prompt_ids(request)
            if request.forced is not None:
                answer = self._forced(ids, request)
            else:
                answer = self._generate(ids, request)
            answer.latency_s = time.perf_counter() - started
            return answer

    def _top(self, logprobs, k: int) -> list:
        values, indices = logprobs.topk(k)
        return [[self.tokenizer.decode([int(i)]), float(v)] for v, i in zip(values, indices)]

    def _generate(self, ids: list[int], request: Request) -> Answer:
        torch = self.torch
        eos = self.tokenizer.eos_token_id
        generated, tokens, past = [], [], None
        step = torch.tensor([ids], device=self.device)
        for _ in range(request.max_tokens):
            out = self.model(input_ids=step, use_cache=True, **{self._cache_arg: past})
            past = getattr(out, self._cache_arg)
            logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            chosen = int(logprobs.argmax())  # temperature 0: greedy, as the cache key promises
            if chosen == eos:
                break
            generated.append(chosen)
            if request.logprobs:
                k = max(1, request.top_logprobs)
                tokens.append([self.tokenizer.decode([chosen]), float(logprobs[chosen]), self._top(logprobs, k)])
            step = torch.tensor([[chosen]], device=self.device)
        text = self.tokenizer.decode(generated, skip_special_tokens=True)
        return Answer(text, tokens if request.logprobs else None, None, len(ids), len(generated))

    @functools.cached_property
    def _answer_ids(self) -> list[list[int]]:
        """The token ids of each answer 0..10."""
        return [self.tokenizer(str(v), add_special_tokens=False)["input_ids"] for v in range(11)]

    def _forced(self, ids: list[int], request: Request) -> Answer:
        """The forced answer after the prompt; at each marker, the log-probability of each answer
        0..10 as the next token (an answer the tokenizer splits into several tokens is left out)."""
        torch = self.torch
        pieces = request.forced.split(request.marker)
        full, marks = list(ids), []
        # One tokenizer call for every piece: a call per piece cost more than the forward itself.
        for i, piece_ids in enumerate(self.tokenizer(pieces, add_special_tokens=False)["input_ids"]):
            full += piece_ids
            if i < len(pieces) - 1:
                marks.append(len(full))
                full += self._answer_ids[0]  # a placeholder continuation; only the logits before it are read
        logits = self.model(input_ids=torch.tensor([full], device=self.device)).logits[0]
        logprobs = torch.log_softmax(logits[[at - 1 for at in marks]].float(), dim=-1)
        single = {str(value): toks[0] for value, toks in enumerate(self._answer_ids) if len(toks) == 1}
        out = [dict(zip(single, row)) for row in logprobs[:, list(single.values())].tolist()]
        return Answer("", None, out, len(full), 0)


def parse_llm(spec: str) -> tuple[str, str]:
    """('openai', 'URL|MODEL'), ('hf', PATH) or ('top-tokens', '')."""
    if spec == NO_MODEL:
        return NO_MODEL, ""
    kind, sep, rest = spec.partition(":")
    if kind == "openai" and sep:
        url, sep2, model = rest.rpartition(":")
        if not sep2 or not url.startswith(("http://", "https://")) or not model:
            raise BadInput(f"--llm {spec!r}: write openai:URL:MODEL, e.g. openai:http://127.0.0.1:8000/v1:qwen")
        return "openai", f"{url}|{model}"
    if kind == "hf" and rest:
        return "hf", rest
    raise BadInput(f"--llm {spec!r}: use openai:URL:MODEL, hf:PATH_OR_CONFIG (e.g. hf:config:qwen3-tiny) or top-tokens")


def model_name(spec: str) -> str:
    """What the cache key and the tables call the model: never the URL's credentials, never a key."""
    kind, rest = parse_llm(spec)
    if kind == "openai":
        url, model = rest.split("|")
        return f"openai:{model}"
    return spec


def open_backend(spec: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0, device: str = "cpu"):
    kind, rest = parse_llm(spec)
    if kind == NO_MODEL:
        return None
    if kind == "openai":
        url, model = rest.split("|")
        return OpenAIBackend(url, model, os.environ.get(api_key_env), timeout)
    return HFBackend(rest, device)


@dataclasses.dataclass
class Counters:
    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    retries: int = 0
    model_seconds: float = 0.0


class Caller:
    """Cached, retried, concurrent calls through one backend (see the module docstring)."""

    def __init__(
        self,
        backend,
        cache,
        *,
        concurrency: int = 4,
        retries: int = 5,
        backoff_s: float = 0.5,
        max_calls: int | None = None,
        on_call: Callable[[Counters], None] | None = None,
    ):
        self.backend, self.cache = backend, cache
        limit = getattr(backend, "max_in_flight", None)
        self.concurrency = max(1, concurrency if limit is None else min(concurrency, limit))
        self.retries, self.backoff_s = retries, backoff_s
        self.max_calls = max_calls
        self.counters = Counters()
        self.on_call = on_call or (lambda counters: None)
        self._lock = threading.Lock()

    def call(self, request: Request) -> Answer:
        key = request.key
        hit = self.cache.get(key)
        if hit is not None:
            with self._lock:
                self.counters.cache_hits += 1
            self.on_call(self.counters)
            return hit
        if self.backend is None:
            raise BadInput("this step needs a language model: give --llm openai:URL:MODEL or --llm hf:PATH")
        with self._lock:
            if self.max_calls is not None and self.counters.calls >= self.max_calls:
                raise BudgetSpent(
                    f"--max-calls {self.max_calls} reached: the calls made are cached; rerun with --resume "
                    f"and a larger --max-calls to finish"
                )
            self.counters.calls += 1
        answer = self._send(request)
        self.cache.put(key, request, answer)
        with self._lock:
            self.counters.prompt_tokens += answer.prompt_tokens
            self.counters.completion_tokens += answer.completion_tokens
            self.counters.model_seconds += answer.latency_s
        self.on_call(self.counters)
        return answer

    def _send(self, request: Request) -> Answer:
        for attempt in range(self.retries + 1):
            try:
                return self.backend.send(request)
            except Retryable as err:
                if attempt == self.retries:
                    raise LLMUnavailable(
                        f"the model server failed {self.retries + 1} times ({err}): the answered calls are cached; "
                        f"rerun with --resume when it is back"
                    ) from None
                with self._lock:
                    self.counters.retries += 1
                time.sleep(min(30.0, self.backoff_s * 2**attempt))
        raise AssertionError("unreachable")

    def map(self, requests: list[Request]) -> list[Answer]:
        """Answers in the order of `requests`, up to `concurrency` in flight."""
        if self.concurrency == 1 or len(requests) <= 1:
            return [self.call(r) for r in requests]
        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(pool.map(self.call, requests))
