#!/usr/bin/env python3
"""Records what transformers answers with the shipped model, for the Rust parity test.

    python -m venv .venv-ml && .venv-ml/bin/pip install -r scripts/requirements-ml.txt
    .venv-ml/bin/python scripts/gen_tiny_model_fixture.py

Loads models/simpleseg-tiny with transformers (`Qwen2_5_VLForConditionalGeneration`, float32,
eager attention, the PIL image processor), asks it to segment each bundled example
(examples/synth, split "demo") with the SimpleSeg default prompt, decodes greedily, and writes
the prompt ids, the answer ids and text, and the gap between the best and the second-best score
at each step (a near tie may break either way under another float summation order) to
fixtures/tiny-model/answers.json.
"""

import json
import pickle
from pathlib import Path

import torch
import transformers
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

ROOT = Path(__file__).resolve().parent.parent
MODEL = ROOT / "models" / "simpleseg-tiny"
EXAMPLES = ROOT / "examples" / "synth"
OUT = ROOT / "fixtures" / "tiny-model"
PROMPT = "Output the polygon coordinates of {query} in the image."
# One query per demo object keeps the fixture small; every object is covered.
MAX_CASES = 12


def demo_cases():
    refs = pickle.load(open(EXAMPLES / "synth" / "refs(unc).p", "rb"), encoding="latin1")
    images = {im["id"]: im for im in json.loads((EXAMPLES / "synth" / "instances.json").read_text())["images"]}
    cases = []
    for ref in refs:
        if ref["split"] != "demo":
            continue
        cases.append({
            "image": f"images/synth/{images[ref['image_id']]['file_name']}",
            "query": ref["sentences"][0]["sent"],
            "ref_id": ref["ref_id"],
        })
    cases = cases[:MAX_CASES]
    # The README's main command, whatever its position among the demo expressions.
    line = next(l for l in (ROOT / "README.md").read_text().splitlines()
                if l.startswith("cargo run --release -- segment "))
    image = line.split("--image ")[1].split()[0].removeprefix("examples/synth/")
    query = line.split('--query "')[1].split('"')[0]
    if not any(c["image"] == image and c["query"] == query for c in cases):
        cases.append({"image": image, "query": query, "ref_id": None})
    return cases


def greedy_margins(model, inputs, generated):
    """Gap between the best and second-best score at each greedy step."""
    margins = []
    ids = inputs["input_ids"]
    for step in range(len(generated)):
        seq = torch.cat([ids, generated[None, :step]], 1)
        extra = {}
        if "mm_token_type_ids" in inputs:
            extra["mm_token_type_ids"] = torch.cat(
                [inputs["mm_token_type_ids"], torch.zeros(1, step, dtype=torch.int64)], 1)
        with torch.no_grad():
            scores = model(**{**inputs, **extra, "input_ids": seq,
                              "attention_mask": torch.ones_like(seq)}).logits[0, -1]
        top = torch.topk(scores, 2).values
        margins.append(float(top[0] - top[1]))
    return margins


def main():
    processor = AutoProcessor.from_pretrained(MODEL, use_fast=False)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        MODEL, dtype=torch.float32, attn_implementation="eager").eval()
    max_new = model.generation_config.max_new_tokens
    out = []
    for case in demo_cases():
        messages = [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": PROMPT.format(query=case["query"])}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        img = Image.open(EXAMPLES / case["image"])
        inputs = processor(images=img, text=text, return_tensors="pt")
        with torch.no_grad():
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=max_new)
        generated = ids[0, inputs["input_ids"].shape[1]:]
        margins = greedy_margins(model, inputs, generated)
        # simpleseg reports the answer without its end-of-sequence token, and why it stopped.
        eos = model.generation_config.eos_token_id
        eos = set(eos if isinstance(eos, list) else [eos])
        stopped_at_eos = len(generated) > 0 and int(generated[-1]) in eos
        if stopped_at_eos:
            generated = generated[:-1]
        answer = processor.batch_decode(generated[None], skip_special_tokens=True)[0]
        out.append({**case, "prompt_ids": inputs["input_ids"][0].tolist(),
                    "answer_ids": generated.tolist(), "answer": answer,
                    "stop_reason": "eos" if stopped_at_eos else "max_tokens",
                    "margins": [round(m, 6) for m in margins], "min_margin": min(margins)})
        print(f"{case['query']!r}: {len(generated)} tokens, min margin {min(margins):.4f}\n  {answer}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "answers.json").write_text(json.dumps({
        "model": "models/simpleseg-tiny",
        "prompt": PROMPT,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "cases": out,
    }, indent=1) + "\n")


if __name__ == "__main__":
    main()
