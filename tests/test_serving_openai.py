"""The OpenAI-compatible API of `sawtrt serve` against a real tritonserver, with the official
`openai` client, curl-style raw HTTP and aiperf's `chat` endpoint type.

One server for the module (started from a temporary directory, as a user would). Temperature 0
everywhere an answer is compared, so texts are deterministic.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest

openai = pytest.importorskip("openai", reason="the dev extra installs the openai client")
pytest.importorskip("fastapi", reason="serving extra not installed")
pytest.importorskip("tritonclient.grpc", reason="serving extra not installed")

from serving_helpers import scrape, served_divergence, start_serve, wait_until  # noqa: E402

from sawtrt.serving.client import generate  # noqa: E402

pytestmark = pytest.mark.slow

MAX_SEQ_LEN = 256
MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def served(smollm2_serving_engine, tmp_path_factory):
    s = start_serve(smollm2_serving_engine, tmp_path_factory.mktemp("openai-serve"))
    yield s
    s.kill_all()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.openai, api_key="unused", max_retries=0, timeout=300)


def post(url, body, raw: bytes | None = None):
    req = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def api_counts(served) -> dict[str, float]:
    m = scrape(served.openai.removesuffix("/v1") + "/metrics")
    return {k.split('"')[1]: v for k, v in m.items() if k.startswith("sawtrt_api_requests_total")}


def test_models_lists_the_engine(client):
    models = client.models.list()
    assert [m.id for m in models] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_streaming_and_not_agree_and_count_tokens(client, smollm2_serving_engine):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a colour."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6,
                                       temperature=0)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason in ("length", "stop") and text
    assert r.usage.completion_tokens == 6 or r.choices[0].finish_reason == "stop"

    # the prompt really is the engine's chat template over both messages
    from sawtrt.models.tokenizer import load
    from sawtrt.serving.openai_api import render_chat
    tok = load(smollm2_serving_engine)
    rendered = render_chat(tok.chat_template, messages)
    assert "You are terse." in rendered and "Name a colour." in rendered
    assert r.usage.prompt_tokens == len(tok.encode(rendered))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens

    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=6, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert streamed == text and finals == [r.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == \
        r.usage.completion_tokens and chunks[-1].usage.prompt_tokens == r.usage.prompt_tokens
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 3   # streamed


def test_completions_match_the_grpc_path(client, served):
    prompt = "The capital of France is"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    g = generate(served.grpc, prompt, 5, timeout=120).check()
    assert r.choices[0].text == g.text and r.usage.completion_tokens == g.num_output_tokens
    assert r.usage.prompt_tokens == g.num_input_tokens
    s = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                  stream=True)
    assert "".join(c.choices[0].text for c in s) == g.text
    # stop strings end the text before them
    first_word = g.text.split()[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0,
                                  stop=[first_word])
    assert r.choices[0].finish_reason == "stop" and first_word not in r.choices[0].text
    # sampling with a seed is reproducible
    a, b = (client.completions.create(model=MODEL, prompt=prompt, max_tokens=5,
                                      temperature=0.9, top_p=0.9, seed=7).choices[0].text
            for _ in range(2))
    assert a == b


def test_bad_requests_get_openai_errors(client, served):
    url = served.openai
    before = api_counts(served)
    cases = [
        (lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                        "content": "hi"}], n=2),
         openai.BadRequestError, "only n=1"),
        (lambda: client.completions.create(model="gpt-4", prompt="hi"), openai.NotFoundError,
         "'gpt-4' not found"),
        (lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=1000),
         openai.BadRequestError, "max_tokens (1000)"),
        (lambda: client.completions.create(model=MODEL, prompt="hi", top_p=7.0),
         openai.BadRequestError, "top_p"),
        (lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=0),
         openai.BadRequestError, "'max_tokens' must be in [1, 2147483647]"),
        (lambda: client.completions.create(model=MODEL, prompt="hi", max_tokens=2**32 + 3),
         openai.BadRequestError, "'max_tokens' must be in [1, 2147483647]"),
        (lambda: client.completions.create(model=MODEL, prompt="hi", logprobs=0),
         openai.BadRequestError, "logprobs"),
        (lambda: client.chat.completions.create(model=MODEL, messages=[]),
         openai.BadRequestError, "'messages' must be a non-empty list"),
        (lambda: client.chat.completions.create(model=MODEL, messages=[{"role": "user",
                                                                        "content": "x"}],
                                                logprobs=True),
         openai.BadRequestError, "logprobs"),
        (lambda: client.completions.create(model=MODEL, prompt="hello " * 300, max_tokens=4),
         openai.BadRequestError, f"max_seq_len is {MAX_SEQ_LEN}"),
    ]
    for call, exc, needle in cases:
        with pytest.raises(exc) as info:
            call()
        assert needle in info.value.body["message"], info.value.body
        assert set(info.value.body) >= {"message", "type", "param", "code"}
    # context overflow names both numbers, streaming or not
    code, text = post(f"{url}/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 300,
                                             "stream": True})
    err = json.loads(text)["error"]
    assert code == 400 and "max_tokens (300)" in err["message"] and \
        f"max_seq_len ({MAX_SEQ_LEN})" in err["message"], err
    code, text = post(f"{url}/completions", None, raw=b"{not json")
    assert code == 400 and "not valid JSON" in json.loads(text)["error"]["message"]
    # half of a UTF-16 pair is valid JSON but not text (a client cutting an emoji in two)
    code, text = post(f"{url}/completions", None,
                      raw=b'{"model": "%s", "prompt": "hi \\ud83d"}' % MODEL.encode())
    assert code == 400 and "lone UTF-16 surrogate" in json.loads(text)["error"]["message"]
    code, text = post(f"{url}/completions", {"model": MODEL, "prompt": "hi", "frobnicate": 1})
    assert code == 400 and "frobnicate" in json.loads(text)["error"]["message"]
    code, text = post(url.removesuffix("/v1") + "/v1/nothing", {})
    assert code == 404 and "error" in json.loads(text)
    n_bad = len(cases) + 5 - 1            # the 404 route is not a generation request
    after = api_counts(served)
    assert after["rejected"] - before["rejected"] == n_bad
    assert after["failed"] == before["failed"]
    # and still serving
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2,
                                     temperature=0).usage.completion_tokens >= 1


def test_cap_max_tokens_opt_in(client):
    prompt = "one two three " * 80                 # ~240 tokens of the 256
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=100, temperature=0,
                                  extra_body={"cap_max_tokens": True})
    assert r.usage.prompt_tokens + r.usage.completion_tokens <= MAX_SEQ_LEN
    assert r.usage.completion_tokens >= 1
    assert r.choices[0].finish_reason in ("length", "stop")


def test_metrics_agree_with_what_clients_saw(client, served):
    import httpx
    base = served.openai.removesuffix("/v1")
    before = scrape(base + "/metrics")
    counts0 = api_counts(served)
    r = client.completions.create(model=MODEL, prompt="Count: one, two,", max_tokens=4,
                                  temperature=0)
    # a client that walks away after the first chunks
    with httpx.Client(timeout=120) as h:
        with h.stream("POST", f"{served.openai}/completions",
                      json={"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 200,
                            "temperature": 0, "ignore_eos": True, "stream": True}) as resp:
            assert resp.status_code == 200
            for n, _ in enumerate(resp.iter_lines()):
                if n >= 3:
                    break
    after = wait_until(lambda: (lambda m: m if api_counts(served)["cancelled"]
                                > counts0["cancelled"] else None)(scrape(base + "/metrics")),
                       30, "the cancelled counter")
    counts = api_counts(served)
    assert counts["completed"] - counts0["completed"] == 1
    assert counts["cancelled"] - counts0["cancelled"] == 1
    assert counts["rejected"] == counts0["rejected"] and counts["failed"] == counts0["failed"]

    def delta(name):
        return after.get(name, 0) - before.get(name, 0)
    assert delta("sawtrt_prompt_tokens_total") == r.usage.prompt_tokens
    assert delta("sawtrt_generation_tokens_total") >= r.usage.completion_tokens + 1
    assert delta("sawtrt_time_to_first_token_seconds_count") == 2
    assert delta("sawtrt_e2e_request_latency_seconds_count") == 1
    assert delta("sawtrt_inter_token_latency_seconds_count") >= r.usage.completion_tokens - 1
    # tritonserver's side, on the same scrape: the engine let go of the cancelled request
    m = wait_until(lambda: (lambda m: m if m.get('sawtrt_kv_cache_used_pages{model="sawtrt"}')
                            == 0 else None)(scrape(base + "/metrics")), 30, "KV pages freed")
    assert m['sawtrt_num_requests_running{model="sawtrt"}'] == 0
    assert m['sawtrt_num_requests_waiting{model="sawtrt"}'] == 0
    assert m['sawtrt_kv_cache_total_pages{model="sawtrt"}'] > 0
    key = 'sawtrt_requests{model="sawtrt",outcome="cancelled"}'
    assert m[key] - before[key] == 1


def test_a_client_that_leaves_without_a_stream_cancels_its_generation(served):
    """A request without a stream whose client times out: counted cancelled, never completed,
    and the engine lets go of it before its 200 tokens are out (several seconds here)."""
    import httpx
    base = served.openai.removesuffix("/v1")
    counts0 = api_counts(served)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{served.openai}/completions", timeout=1.0,
                   json={"model": MODEL, "prompt": "Tell me a long story.", "max_tokens": 200,
                         "temperature": 0, "ignore_eos": True})
    wait_until(lambda: api_counts(served)["cancelled"] > counts0["cancelled"], 30,
               "the cancelled counter")
    m = wait_until(lambda: (lambda m: m if m.get('sawtrt_kv_cache_used_pages{model="sawtrt"}')
                            == 0 else None)(scrape(base + "/metrics")), 30, "KV pages freed")
    assert m['sawtrt_num_requests_running{model="sawtrt"}'] == 0
    counts = api_counts(served)
    assert counts["cancelled"] - counts0["cancelled"] == 1
    assert counts["completed"] == counts0["completed"] and counts["failed"] == counts0["failed"]


def test_cli_client_with_no_server_is_a_clean_error():
    r = subprocess.run([sys.executable, "-m", "sawtrt", "client", "hi", "--url", "127.0.0.1:1",
                        "--timeout", "20"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "Error:" in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_concurrent_streams(client, smollm2_serving_engine):
    """Eight concurrent streams; the first two are what the engine gives for their prompts
    locally, but for a greedy pick at a near-tie that the batch decided otherwise."""
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(8)]
    out = [None] * len(prompts)

    def user(i):
        s = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=4,
                                      temperature=0, stream=True)
        out[i] = "".join(c.choices[0].text for c in s)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(o is not None for o in out)
    from sawtrt.engine.llm import LLM
    from sawtrt.engine.sampling import SamplingParams
    llm = LLM(smollm2_serving_engine, device="cpu")
    for p, text in zip(prompts[:2], out[:2]):
        local = llm.generate([p], SamplingParams(max_tokens=4))[0]
        if text != local.text:
            assert served_divergence(llm, p, local.token_ids, text) is None, (p, text, local)


def test_aiperf_chat_endpoint(served, smollm2_serving_engine, tmp_path):
    aiperf = shutil.which("aiperf") or str(Path(sys.executable).parent / "aiperf")
    if not Path(aiperf).exists():
        pytest.skip("aiperf is not installed (the dev extra installs it)")
    tok = tmp_path / "tokenizer"          # aiperf loads a Hugging Face tokenizer directory
    tok.mkdir()
    shutil.copy(Path(smollm2_serving_engine) / "tokenizer.json", tok / "tokenizer.json")
    (tok / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast"}))
    art = tmp_path / "artifacts"
    r = subprocess.run(
        [aiperf, "profile", "--model-names", MODEL, "--url", served.openai.removesuffix("/v1"),
         "--endpoint-type", "chat", "--streaming", "--tokenizer", str(tok),
         "--use-server-token-count", "--request-count", "6", "--concurrency", "2",
         "--prompt-input-tokens-mean", "16", "--prompt-input-tokens-stddev", "0",
         "--prompt-output-tokens-mean", "4", "--prompt-output-tokens-stddev", "0",
         "--extra-inputs", "ignore_eos:true", "--ui-type", "none", "--workers-max", "1",
         "--no-server-metrics", "--no-gpu-telemetry", "--output-artifact-dir", str(art)],
        capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rec = json.loads((art / "profile_export_aiperf.json").read_text())
    assert rec["request_count"]["avg"] == 6, rec.get("error_summary")
    assert not rec.get("error_summary"), rec["error_summary"]
    assert rec["output_sequence_length"]["min"] == rec["output_sequence_length"]["max"] == 4
    assert rec["time_to_first_token"]["avg"] > 0 and rec["inter_token_latency"]["avg"] > 0
