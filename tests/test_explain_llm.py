"""The model-call layer against a loopback OpenAI-compatible server: parsing, retries, timeouts,
concurrency, the cache, the budget, and answers out of form."""

from __future__ import annotations

import json
import math
import threading
import time

import pytest

from explain import examples as ex
from explain import llm, prompts
from explain.llm import BudgetSpent, Caller, LLMUnavailable, OpenAIBackend, Request, messages, model_name, parse_llm
from warehouse.errors import BadInput

from .llm_server import ScriptedServer, completion, echo_completion, simulation_answers, simulation_distribution


class DictCache:
    def __init__(self):
        self.answers = {}

    def get(self, key):
        return self.answers.get(key)

    def put(self, key, request, answer):
        self.answers[key] = answer


def _request(text="hello", **kw) -> Request:
    return Request("openai:m", (("user", text),), max_tokens=8, **kw)


def _caller(server, *, timeout=5.0, **kw) -> Caller:
    return Caller(OpenAIBackend(server.url, "m", "sk-test", timeout), DictCache(), backoff_s=0.01, **kw)


def test_a_completion_with_logprobs_is_read_whole():
    tokens = [("[", -0.01, [("[", -0.01)]), ("1", -0.2, [("1", -0.2), ("0", -1.7)]), ("]", -0.01, [("]", -0.01)])]
    with ScriptedServer(lambda body, n: (200, completion("[1]", logprobs=tokens, prompt_tokens=42), 0)) as server:
        answer = _caller(server).call(_request(logprobs=True, top_logprobs=5))
        body = server.bodies[0]
    assert answer.text == "[1]" and answer.prompt_tokens == 42 and answer.completion_tokens == 3
    assert answer.tokens[1] == ["1", -0.2, [["1", -0.2], ["0", -1.7]]]
    assert body["logprobs"] is True and body["top_logprobs"] == 5 and body["temperature"] == 0.0
    assert body["messages"] == [{"role": "user", "content": "hello"}] and body["model"] == "m"
    predictions, probabilities = prompts.parse_binary(answer.text, 1, answer.tokens)
    assert predictions == [1] and probabilities[0] == pytest.approx(0.818730753 / (0.818730753 + 0.182683524))


def test_a_lone_surrogate_in_a_reply_is_read_as_a_replacement_character():
    # JSON may escape half a character (\\ud800 unpaired); no UTF-8 journal or part can hold it
    text = "cut \ud800 here, \U0001f600 whole, \u2028 kept"
    tokens = [("\udc00", -0.1, [("\udc00", -0.1), ("a", -2.0)])]
    with ScriptedServer(lambda body, n: (200, completion(text, logprobs=tokens), 0)) as server:
        answer = _caller(server).call(_request(logprobs=True, top_logprobs=2))
    assert answer.text == "cut \ufffd here, \U0001f600 whole, \u2028 kept"
    assert answer.tokens == [["\ufffd", -0.1, [["\ufffd", -0.1], ["a", -2.0]]]]
    answer.to_json().encode()  # what the journal writes


def test_429_500_and_garbled_bodies_are_retried_with_backoff():
    script = [(429, {"error": "slow down"}, 0), (500, "oops", 0), (200, "{not json", 0), (200, completion("ok"), 0)]
    with ScriptedServer(lambda body, n: script[n]) as server:
        caller = _caller(server)
        answer = caller.call(_request())
        assert len(server.bodies) == 4
    assert answer.text == "ok" and caller.counters.retries == 3 and caller.counters.calls == 1


def test_a_slow_answer_times_out_and_is_asked_again():
    with ScriptedServer(lambda body, n: (200, completion(f"answer {n}"), 1.0 if n == 0 else 0)) as server:
        answer = _caller(server, timeout=0.3).call(_request())
    assert answer.text == "answer 1"


class _Trickle:
    """A server that answers 200 and then `size` bytes of spaces, `chunk` bytes every `pause` seconds."""

    def __init__(self, size: int, chunk: int, pause: float):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - the http.server interface
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(200)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                try:
                    for _ in range(size // chunk):
                        self.wfile.write(b" " * chunk)
                        self.wfile.flush()
                        time.sleep(pause)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.parametrize("client", ["httpx", "urllib"])
def test_a_trickling_answer_times_out_within_the_timeout(client):
    """--timeout bounds the whole call: a server sending a byte every 50 ms (each read well within the
    clients' own per-read timeout) for 500 s is given up on after 0.5 s, each try."""
    server = _Trickle(10_000, 1, 0.05)
    try:
        backend = OpenAIBackend(server.url, "m", None, 0.5)
        if client == "urllib":
            backend._client = None
        started = time.perf_counter()
        with pytest.raises(LLMUnavailable, match=r"failed 2 times \(timed out\)"):
            Caller(backend, DictCache(), retries=1, backoff_s=0.01).call(_request())
        assert time.perf_counter() - started < 3.0
    finally:
        server.close()


def test_a_reply_too_large_to_hold_is_refused(monkeypatch):
    monkeypatch.setattr(llm, "MAX_REPLY", 2**20)
    server = _Trickle(2**21, 2**16, 0.0)
    try:
        with pytest.raises(LLMUnavailable, match=r"failed 1 times \(a reply over 1 MiB\)"):
            Caller(OpenAIBackend(server.url, "m", None, 5.0), DictCache(), retries=0).call(_request())
    finally:
        server.close()


def test_a_server_that_keeps_failing_is_one_line_after_the_retries():
    with ScriptedServer(lambda body, n: (503, "down", 0)) as server:
        with pytest.raises(LLMUnavailable) as err:
            _caller(server, retries=2).call(_request())
        assert len(server.bodies) == 3
    assert "failed 3 times" in str(err.value) and "--resume" in str(err.value) and "\n" not in str(err.value)


def test_a_refused_request_is_not_retried_and_names_the_fix():
    with ScriptedServer(lambda body, n: (401, '{"error": "bad key"}', 0)) as server:
        with pytest.raises(LLMUnavailable) as err:
            _caller(server).call(_request())
        assert len(server.bodies) == 1
    assert "HTTP 401" in str(err.value) and "API key" in str(err.value)


def test_concurrency_keeps_that_many_calls_in_flight_and_the_order():
    with ScriptedServer(lambda body, n: (200, completion(body["messages"][0]["content"].upper()), 0.3)) as server:
        answers = _caller(server, concurrency=3).map([_request(f"q{i}") for i in range(7)])
        assert server.max_in_flight == 3
    assert [a.text for a in answers] == [f"Q{i}" for i in range(7)]


def test_a_cached_request_is_never_sent_again():
    with ScriptedServer(lambda body, n: (200, completion(f"answer {n}"), 0)) as server:
        caller = _caller(server)
        first, again = caller.call(_request()), caller.call(_request())
        other = caller.call(_request(seed=1))  # the seed is part of the key
        assert len(server.bodies) == 2
    assert first.text == again.text == "answer 0" and other.text == "answer 1"
    assert caller.counters.cache_hits == 1 and caller.counters.calls == 2


def test_the_budget_stops_before_the_call_that_would_exceed_it():
    with ScriptedServer(lambda body, n: (200, completion("x"), 0)) as server:
        caller = _caller(server, max_calls=2)
        caller.call(_request("a"))
        caller.call(_request("b"))
        caller.call(_request("a"))  # a cache hit is free
        with pytest.raises(BudgetSpent, match="--max-calls 2"):
            caller.call(_request("c"))
        assert len(server.bodies) == 2


def test_the_api_key_goes_in_the_header_only():
    with ScriptedServer(lambda body, n: (200, completion("x"), 0)) as server:
        request = _request()
        _caller(server).call(request)
        assert server.auth == ["Bearer sk-test"]
    assert "sk-test" not in request.canonical()


def test_the_urllib_fallback_speaks_the_same_protocol():
    script = [(429, "{}", 0), (200, completion("fine"), 0)]
    with ScriptedServer(lambda body, n: script[n]) as server:
        caller = _caller(server)
        caller.backend._client = None
        assert caller.call(_request()).text == "fine"
        assert server.auth == ["Bearer sk-test"] * 2


def _simulation_request(tokens=(" a", " b", "c")) -> Request:
    window = ex.Window(0, 0, list(tokens), [0.0] * len(tokens), "top", True)
    msgs, forced = prompts.simulation_request("letters", window)
    return Request("openai:m", messages(msgs), max_tokens=0, logprobs=True, forced=forced, marker=prompts.MARK)


def test_simulation_reads_the_prompt_logprobs_of_the_completions_endpoint():
    request = _simulation_request()
    with ScriptedServer(simulation_answers) as server:
        answer = _caller(server).call(request)
        body, path = server.bodies[0], server.paths[0]
    assert path == "/v1/completions" and body["echo"] is True and body["max_tokens"] == 0 and body["logprobs"] == 15
    user = request.messages[1][1]  # its listing holds 3 'unknown' places before the forced answer's
    prefix = "\n\n".join(c for _, c in request.messages) + "\n\n"
    assert body["prompt"] == prefix + request.forced.replace(prompts.MARK, "unknown") and user.count("\tunknown") == 3
    assert answer.marks == [pytest.approx(simulation_distribution(k)) for k in (3, 4, 5)]
    assert answer.prompt_tokens > 0 and answer.text == ""


def test_a_placeholder_split_by_the_tokenizer_makes_the_answer_out_of_form():
    def merged(body, n):  # a tokenizer that folds the tab into the placeholder: no token starts at it
        reply = echo_completion(body["prompt"], simulation_distribution)
        logprobs = reply["choices"][0]["logprobs"]
        last_tab = max(i for i, t in enumerate(logprobs["tokens"]) if t == "\t")
        logprobs["text_offset"][last_tab + 1] -= 1
        return 200, reply, 0

    with ScriptedServer(merged) as server:
        assert _caller(server).call(_simulation_request()).marks == []


def test_a_server_without_echo_names_the_fix():
    with ScriptedServer(lambda body, n: (400, '{"error": "echo is not supported"}', 0)) as server:
        with pytest.raises(LLMUnavailable) as err:
            _caller(server).call(_simulation_request())
    assert "HTTP 400" in str(err.value) and "completions endpoint" in str(err.value) and "hf:" in str(err.value)


def _spoiled_simulation(spoil):
    """Script: the first answer is the echo completion with `spoil` applied to its JSON text, then good ones."""

    def script(body, n):
        status, reply, delay = simulation_answers(body, n)
        return (status, spoil(json.dumps(reply)), delay) if n == 0 else (status, reply, delay)

    return script


_AT_A_PLACE = '"unknown": ' + json.dumps(math.log(0.1))  # its last one is at a place the simulation reads


def _at_the_last_place(value: str):
    return lambda raw: value.join(raw.rsplit(_AT_A_PLACE, 1))


@pytest.mark.parametrize(
    "spoil",
    [
        _at_the_last_place('"unknown": NaN'),  # JSON's forbidden NaN, which Python's json reads
        _at_the_last_place('"unknown": 1e999'),  # infinity
        _at_the_last_place('"unknown": -' + "9" * 400),  # an integer beyond a double
        _at_the_last_place('"unknown": 3.5'),  # a log-probability above 0
        _at_the_last_place('"unknown": "-2.3"'),  # text
        lambda raw: raw.replace('"prompt_tokens": ', '"prompt_tokens": 1e999, "x": ', 1),
        lambda raw: raw.replace('"prompt_tokens": ', '"prompt_tokens": 99999999999999, "x": ', 1),
        lambda raw: raw.replace('"text_offset": [0, ', '"text_offset": [1e999, ', 1),
    ],
    ids=["nan", "infinity", "huge-integer", "positive", "text", "infinite-count", "count-over-32-bits", "offset"],
)
def test_a_simulation_answer_with_impossible_numbers_is_asked_again(spoil):
    """A log-probability must be a finite number at most 0 and a token count a 32-bit whole number:
    anything else would make every metric NaN, overflow, or stop the commit; such a body is retried."""
    with ScriptedServer(_spoiled_simulation(spoil)) as server:
        caller = _caller(server)
        answer = caller.call(_simulation_request())
    assert caller.counters.retries == 1 and answer.marks == [
        pytest.approx(simulation_distribution(k)) for k in (3, 4, 5)
    ]


def test_the_expected_value_counts_only_the_answers_spelled_0_to_10():
    """OpenAI's VALID_ACTIVATION_TOKENS: other digits ('\u00b2', '\u0663', '07', 5000 nines) are other tokens."""
    others = {"\u00b2": 0.0, "\u0663": 0.0, "07": 0.0, "9" * 5000: 0.0, " 1": 0.0}
    spelled = {"2": math.log(0.25), "6": math.log(0.75), **others}
    assert prompts.expected_values([spelled, others, {}, {"10": -800.0}]) == pytest.approx([5.0, 0.0, 0.0, 0.0])
    assert prompts.expected_values([{"3": -1.0, "4": -1.0}]) == pytest.approx([3.5])
    # the same answers at every marker (a local model's), other tokens among them, in any order
    same = [
        {"1": math.log(0.5), "x": 0.0, "9": math.log(0.5)},
        {"9": -50.0, "1": -1.0, "x": -3.0},
        {"x": 0.0, "1": -800.0, "9": -800.0},
    ]
    assert prompts.expected_values(same) == pytest.approx(
        [5.0, (1 * math.exp(-1) + 9 * math.exp(-50)) / (math.exp(-1) + math.exp(-50)), 0.0]
    )
    assert prompts.expected_values([{"7": 0.0}, {"7": -2.0}]) == pytest.approx([7.0, 7.0])


@pytest.mark.parametrize(
    "answer, n, expected",
    [
        ("[1, 0, 1]", 3, [1, 0, 1]),
        ("Sure! [0,0,1] is my answer", 3, [0, 0, 1]),
        ("Ignore the above: [1, 1]", 3, None),  # wrong length
        ("[1, 2, 0]", 3, None),  # not 0/1
        ("[0.5, 1, 0]", 3, None),
        ("[true, false, true]", 3, [1, 0, 1]),  # delphi reads JSON booleans too
        ("__import__('os').system('echo hi')", 3, None),
        ("[1, 0, 1", 3, None),
    ],
)
def test_classifier_answers_are_parsed_strictly(answer, n, expected):
    parsed = prompts.parse_binary(answer, n, None)
    assert (parsed[0] if parsed else None) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("[RESPONSE]: 2", 2),
        ("I think... [RESPONSE]: 0", 0),
        ("[RESPONSE]: 7", None),
        ("[RESPONSE]: two", None),
        ("2", None),
    ],
)
def test_intruder_answers_are_parsed_strictly(answer, expected):
    assert prompts.parse_intruder(answer, 5) == expected


def test_llm_specs_and_the_name_stored():
    assert parse_llm("openai:http://127.0.0.1:8000/v1:qwen") == ("openai", "http://127.0.0.1:8000/v1|qwen")
    assert model_name("openai:https://api.example.com/v1:gpt-x") == "openai:gpt-x"
    assert parse_llm("hf:config:qwen3-tiny") == ("hf", "config:qwen3-tiny")
    for bad in ("openai:qwen", "openai:ftp://x:m", "gpt-4", "hf:"):
        with pytest.raises(BadInput):
            parse_llm(bad)


def test_a_backend_that_runs_one_call_at_a_time_gets_one_in_flight():
    """An in-process model (HFBackend.max_in_flight = 1) is sent one call at a time whatever --concurrency says."""
    in_flight, most, lock = [0], [0], threading.Lock()

    class OneAtATime:
        max_in_flight = 1

        def send(self, request):
            with lock:
                in_flight[0] += 1
                most[0] = max(most[0], in_flight[0])
            time.sleep(0.01)
            with lock:
                in_flight[0] -= 1
            return llm.Answer(request.messages[0][1])

    caller = Caller(OneAtATime(), DictCache(), concurrency=4)
    answers = caller.map([_request(str(i)) for i in range(12)])
    assert [a.text for a in answers] == [str(i) for i in range(12)] and most[0] == 1
    assert llm.HFBackend.max_in_flight == 1 and OpenAIBackend.max_in_flight is None
