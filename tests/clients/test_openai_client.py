"""The official `openai` package against `simpleseg serve`, and the eval runner's openai
backend against the local one: the same answers and the same report."""

import base64
import json
import subprocess

from conftest import BIN, ROOT

from openai import OpenAI

PROMPT = "Output the polygon coordinates of the red shape in the image."


def data_url(path):
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def local_greedy(image, prompt, max_tokens, *extra):
    out = subprocess.run([str(BIN), "chat", "--image", str(image), "--prompt", prompt, "--greedy",
                          "--max-new-tokens", str(max_tokens), "--json", *extra],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["text"]


def test_plain_and_streamed_completions(server, demo_image):
    base, _ = server
    client = OpenAI(base_url=base + "/v1", api_key="unused")
    models = client.models.list()
    name = models.data[0].id
    messages = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(demo_image)}},
        {"type": "text", "text": PROMPT}]}]
    want = local_greedy(demo_image, PROMPT, 48)
    reply = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=48)
    assert reply.choices[0].message.content == want
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    chunks = client.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=48,
                                            stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == want
    # n sampled answers, each reproducible by its seed.
    reply = client.chat.completions.create(model=name, messages=messages, temperature=1.0, seed=5, n=3,
                                           max_tokens=24)
    assert len(reply.choices) == 3


def test_eval_over_the_server_matches_local(server, tmp_path):
    base, _ = server
    common = ["--refer-root", str(ROOT / "examples/synth"), "--dataset", "synth", "--split", "demo",
              "--limit", "6"]
    subprocess.run([str(BIN), "eval", *common, "--out", str(tmp_path / "local")], check=True,
                   capture_output=True)
    subprocess.run([str(BIN), "eval", *common, "--backend", "openai", "--base-url", base + "/v1",
                    "--model", "default", "--concurrency", "3", "--out", str(tmp_path / "served")],
                   check=True, capture_output=True)
    local = json.loads((tmp_path / "local/report.json").read_text())
    served = json.loads((tmp_path / "served/report.json").read_text())
    for key in ("n", "ciou", "giou", "acc50", "parse_failures"):
        assert local[key] == served[key], key
    answers = lambda p: {(r["ref_id"], r["sent_id"]): r["answer"]
                         for r in map(json.loads, (p / "predictions.jsonl").read_text().splitlines())}
    assert answers(tmp_path / "local") == answers(tmp_path / "served")


def test_langchain_with_a_system_message(server, demo_image):
    """LangChain's ChatOpenAI always may send a SystemMessage: it is applied as the command
    line's --system is, and the penalties as OpenAI defines them."""
    langchain_openai = __import__("pytest").importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage, SystemMessage

    base, _ = server
    chat = langchain_openai.ChatOpenAI(base_url=base + "/v1", api_key="unused", model="default",
                                       temperature=0, max_tokens=48)
    messages = [SystemMessage(content="You segment objects."),
                HumanMessage(content=[{"type": "image_url", "image_url": {"url": data_url(demo_image)}},
                                      {"type": "text", "text": PROMPT}])]
    reply = chat.invoke(messages)
    assert reply.content == local_greedy(demo_image, PROMPT, 48, "--system", "You segment objects.")
    penalized = langchain_openai.ChatOpenAI(base_url=base + "/v1", api_key="unused", model="default",
                                            temperature=0, max_tokens=48, presence_penalty=1.5,
                                            frequency_penalty=0.75).invoke(messages[1:])
    assert penalized.content == local_greedy(demo_image, PROMPT, 48, "--presence-penalty", "1.5",
                                             "--frequency-penalty", "0.75")
