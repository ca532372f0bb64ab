"""`simpleseg.Model` against the command line (the same build's `simpleseg` binary): the same
answers and the same masks, on the built-in Qwen2.5-VL model and the tiny Kimi-VL fixture;
every image input type; batches equal single calls; errors as Python exceptions with the
command line's messages; the GIL released while the model runs."""

import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import simpleseg

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(os.environ.get("SIMPLESEG_BIN", ROOT / "target/release/simpleseg"))
DEMO = ROOT / "examples/synth/images/synth"
KIMI = ROOT / "fixtures/kimi/kimi-tiny"
QUERY = "the red shape"


def cli(*args):
    assert BIN.is_file(), f"build the command line first ({BIN})"
    out = subprocess.run([str(BIN), *map(str, args)], check=True, capture_output=True, text=True)
    return out.stdout


def cli_segment(image, *target, model=None, extra=()):
    args = ["segment", "--image", image, *target, "--json", "--rle-out", os.devnull, *extra]
    if model:
        args += ["--model", model]
    return json.loads(cli(*args))


@pytest.fixture(scope="module")
def model():
    return simpleseg.Model()


@pytest.fixture(scope="module")
def images():
    return sorted(DEMO.glob("*.png"))[:4]


def same(result, expected):
    assert result.answer == expected["answer"]
    assert result.rle == expected["rle"]
    assert result.polygons == expected["polygons"]
    assert result.bbox == expected["bbox"] and result.area == expected["area"]
    assert result.token_ids == expected["token_ids"]


def test_segment_equals_the_command_line(model, images):
    for image in images[:2]:
        same(model.segment(image, QUERY), cli_segment(image, "--query", QUERY))
    same(model.segment(images[0], point=[0.5, 0.5]), cli_segment(images[0], "--point", "0.5,0.5"))
    same(model.segment(images[1], box=[0.1, 0.1, 0.9, 0.9]),
         cli_segment(images[1], "--box", "0.1,0.1,0.9,0.9"))
    same(model.segment(images[2], QUERY, constrain="polygon", max_new_tokens=24),
         cli_segment(images[2], "--query", QUERY, extra=["--constrain", "polygon", "--max-new-tokens", "24"]))
    same(model.segment(images[3], QUERY, temperature=0.9, seed=4),
         cli_segment(images[3], "--query", QUERY, extra=["--temperature", "0.9", "--seed", "4"]))
    r = model.segment(images[0], QUERY)
    mask = r.mask
    assert mask.shape == (r.rle["size"][0], r.rle["size"][1]) and mask.dtype == np.uint8
    assert int(mask.sum()) == r.area
    assert np.array_equal(mask, simpleseg.rle_decode(r.rle))
    assert r.to_dict()["svg"] == r.svg and r.svg.startswith("M ")


def test_every_image_input_gives_the_same_answer(model, images):
    from PIL import Image

    path = images[0]
    expected = model.segment(path, QUERY)
    pil = Image.open(path)
    for image in (str(path), path.read_bytes(), pil, np.asarray(pil.convert("RGB")),
                  np.asarray(pil.convert("RGBA")), np.asarray(pil.convert("RGB"))[:, :, :].copy(order="F")):
        assert model.segment(image, QUERY).answer == expected.answer
    grey = np.asarray(pil.convert("L"))
    assert model.segment(grey, QUERY).rle["size"] == list(grey.shape)


def test_batches_equal_single_calls_and_the_batch_command(model, images, tmp_path):
    items = [(images[0], QUERY), {"image": images[1], "point": [0.5, 0.5]},
             {"image": images[2], "box": [0.2, 0.2, 0.8, 0.8]}, (images[3], QUERY)]
    batched = model.segment_batch(items, batch_size=3)
    singles = [model.segment(images[0], QUERY), model.segment(images[1], point=[0.5, 0.5]),
               model.segment(images[2], box=[0.2, 0.2, 0.8, 0.8]), model.segment(images[3], QUERY)]
    assert [b.to_dict() | {"timings": None} for b in batched] == [s.to_dict() | {"timings": None} for s in singles]
    lines = [{"image": str(images[0]), "query": QUERY}, {"image": str(images[1]), "point": [0.5, 0.5]},
             {"image": str(images[2]), "box": [0.2, 0.2, 0.8, 0.8]}, {"image": str(images[3]), "query": QUERY}]
    (tmp_path / "items.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines))
    cli("segment", "--batch", tmp_path / "items.jsonl", "--out", tmp_path / "out")
    answers = [json.loads(l) for l in (tmp_path / "out/answers.jsonl").read_text().splitlines()]
    assert [a["answer"] for a in answers] == [b.answer for b in batched]
    assert [a["rle"] for a in answers] == [b.rle for b in batched]


def test_chat_equals_the_command_line(model, images):
    prompt = "Output the polygon coordinates of the red shape in the image."
    expected = json.loads(cli("chat", "--image", images[0], "--prompt", prompt, "--greedy",
                              "--max-new-tokens", "32", "--json"))
    answer = model.chat(images[0], prompt, greedy=True, max_new_tokens=32)
    assert str(answer) == answer.text == expected["text"]
    assert answer.token_ids == expected["token_ids"] and answer.prompt_tokens == expected["prompt_tokens"]
    sampled = [json.loads(l) for l in cli("chat", "--image", images[0], "--prompt", prompt, "--n", "3",
                                          "--temperature", "0.7", "--seed", "5", "--max-new-tokens", "16",
                                          "--json").splitlines()]
    answers = model.chat(images[0], prompt, n=3, temperature=0.7, seed=5, max_new_tokens=16)
    assert [a.text for a in answers] == [s["text"] for s in sampled]
    assert [a.seed for a in answers] == [5, 6, 7]
    system = json.loads(cli("chat", "--image", images[0], "--prompt", prompt, "--system", "Be brief.",
                            "--max-new-tokens", "16", "--json"))
    assert model.chat(images[0], prompt, system="Be brief.", max_new_tokens=16).text == system["text"]


def test_kimi_fixture_equals_the_command_line():
    kimi = simpleseg.Model(KIMI)
    assert kimi.architecture == "kimi_vl"
    image = KIMI / "scaled.png"
    for extra in ([], ["--max-new-tokens", "12"]):
        kwargs = {"max_new_tokens": 12} if extra else {}
        same(kimi.segment(image, "the table", **kwargs),
             cli_segment(image, "--query", "the table", model=KIMI, extra=extra))


def test_errors_are_python_exceptions_with_the_command_lines_messages(model, images, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.png"):
        model.segment(tmp_path / "nope.png", QUERY)
    with pytest.raises(FileNotFoundError, match="loading the model in"):
        simpleseg.Model(tmp_path / "missing-folder")
    with pytest.raises(ValueError, match="give one of query, point and box"):
        model.segment(images[0], QUERY, point=[0.5, 0.5])
    with pytest.raises(ValueError, match="point is a sequence of 2 numbers"):
        model.segment(images[0], point=[0.5])
    with pytest.raises(ValueError, match="temperature must be at least"):
        model.segment(images[0], QUERY, temperature=1e-300)
    with pytest.raises(TypeError, match="tempreature"):
        model.segment(images[0], QUERY, tempreature=0.5)
    with pytest.raises(ValueError, match="constrain is"):
        model.segment(images[0], QUERY, constrain="json")
    with pytest.raises(ValueError, match="needs sampling"):
        model.chat(images[0], "hi", n=2)
    with pytest.raises(ValueError, match="item 1"):
        model.segment_batch([(images[0], QUERY), {"image": images[0]}])
    with pytest.raises(TypeError, match="an image is"):
        model.segment(42, QUERY)
    # The command line says the same.
    out = subprocess.run([str(BIN), "segment", "--image", str(tmp_path / "nope.png"), "--query", QUERY],
                         capture_output=True, text=True)
    assert out.returncode != 0 and "nope.png: No such file or directory" in out.stderr


def test_the_gil_is_released_while_the_model_runs(images):
    model = simpleseg.Model(threads=1)
    ticks = []
    stop = threading.Event()

    def count():
        while not stop.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    counter = threading.Thread(target=count)
    counter.start()
    start = time.perf_counter()
    results = model.segment_batch([(images[i % 4], QUERY) for i in range(16)], batch_size=4)
    end = time.perf_counter()
    stop.set()
    counter.join()
    during = [t for t in ticks if start < t < end]
    # Python ran beside the model: about one tick per millisecond of the batch.
    assert len(during) > 0.3 * (end - start) * 1000, (len(during), end - start)
    assert [r.answer for r in results[:4]] == [simpleseg.Model().segment(images[i], QUERY).answer for i in range(4)]
