#!/usr/bin/env python3
"""Where does simpleseg-tiny lose the query's colour? Two probes with transformers.

    .venv-ml/bin/python scripts/experiments/probe_tiny_grounding.py ROOT [MODEL]

ROOT is a `simpleseg data synth` folder with train and val splits; MODEL defaults to
models/simpleseg-tiny.

1. Vision side: a linear probe (trained on train-split images, scored on the others) reads the
   colour of an object, named by a colour-only query such as "the red shape", from the image
   token under the centre of its box.
2. Language side: for colour-only queries in validation scenes with several objects, the
   attention of the last prompt position (the one that writes the first coordinate), per layer and
   head: its weight on the colour word, its total weight on image tokens, and the share of that
   image attention on the named object's centre token (uniform: 1/16).
3. Positions: a linear probe per layer (trained on 300 images, scored on 100 others) reads each
   image token's own row and column (4 x 4 grid) from its hidden state: the vision tower's
   output (layer 0) and the language model's layers after it.
"""

import collections
import json
import pickle
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from synth_error_breakdown import query_kind

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]


def colour_only(sentence):
    """The colour of a colour-only query ("the red shape"), else None."""
    return sentence.split()[1] if query_kind(sentence) == "colour only" else None


def centre_token(bbox, grid=4, cell=28):
    x, y, w, h = bbox
    return min(int((y + h / 2) // cell), grid - 1) * grid + min(int((x + w / 2) // cell), grid - 1)


def main(root, model_dir):
    processor = AutoProcessor.from_pretrained(model_dir, use_fast=False)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    refs = pickle.load(open(root / "synth" / "refs(unc).p", "rb"))
    instances = json.loads((root / "synth" / "instances.json").read_text())
    images = {i["id"]: i for i in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    objects_in = collections.Counter(a["image_id"] for a in instances["annotations"])
    image_path = lambda image_id: root / "images" / "synth" / images[image_id]["file_name"]

    # 1. Vision probe.
    labelled = collections.defaultdict(list)
    for r in refs:
        for s in r["sentences"]:
            if colour_only(s["sent"]):
                labelled[r["image_id"]].append((r["ann_id"], COLOURS.index(colour_only(s["sent"])), r["split"]))
    train = [i for i in labelled.items() if i[1][0][2] == "train"][:1200]
    other = [i for i in labelled.items() if i[1][0][2] != "train"]
    feats, labels, is_train = [], [], []
    for image_id, objs in train + other:
        inputs = processor.image_processor(images=Image.open(image_path(image_id)).convert("RGB"),
                                           return_tensors="pt")
        with torch.no_grad():
            out = model.model.visual(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"])
        tokens = getattr(out, "pooler_output", out)
        for ann_id, colour, split in objs:
            feats.append(tokens[centre_token(anns[ann_id]["bbox"])])
            labels.append(colour)
            is_train.append(split == "train")
    x, y, tr = torch.stack(feats), torch.tensor(labels), torch.tensor(is_train)
    x = (x - x[tr].mean(0)) / (x[tr].std(0) + 1e-6)
    probe = torch.nn.Linear(x.shape[1], len(COLOURS))
    opt = torch.optim.Adam(probe.parameters(), 1e-2)
    for _ in range(500):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(probe(x[tr]), y[tr]).backward()
        opt.step()
    held = ~tr
    acc = (probe(x[held]).argmax(1) == y[held]).float().mean().item()
    majority = np.bincount(y[held].numpy()).max() / int(held.sum())
    print(f"vision probe: colour read from the object's centre token, {acc:.3f} on {int(held.sum())} "
          f"held-out objects (majority class {majority:.3f})")

    # 2. Attention of the position that writes the first coordinate.
    total, n = None, 0
    for r in refs:
        if r["split"] != "val" or objects_in[r["image_id"]] < 2:
            continue
        for s in r["sentences"]:
            colour = colour_only(s["sent"])
            if not colour:
                continue
            messages = [{"role": "user", "content": [
                {"type": "image"},
                {"type": "text", "text": f"Output the polygon coordinates of {s['sent']} in the image."}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = processor(images=Image.open(image_path(r["image_id"])), text=text, return_tensors="pt")
            ids = inputs["input_ids"][0].tolist()
            word = processor.tokenizer.encode(" " + colour)
            if len(word) != 1 or word[0] not in ids:
                continue
            j = ids.index(word[0])
            image_pos = [k for k, t in enumerate(ids) if t == model.config.image_token_id]
            with torch.no_grad():
                att = torch.stack([a[0, :, -1] for a in model(**inputs, output_attentions=True).attentions])
            to_image = att[:, :, image_pos].sum(-1)
            named = att[:, :, image_pos[centre_token(anns[r["ann_id"]]["bbox"])]] / to_image.clamp(min=1e-9)
            v = torch.stack([att[:, :, j], to_image, named], -1)
            total = v if total is None else total + v
            n += 1
    mean = total / n
    print(f"attention of the last prompt position, mean over {n} colour-only queries in scenes with several objects")
    for layer in range(mean.shape[0]):
        row = lambda k: " ".join(f"{float(v):.3f}" for v in mean[layer, :, k])
        print(f"layer {layer}: colour word [{row(0)}]  image tokens [{row(1)}]  "
              f"named object's share of image attention [{row(2)}]")

    # 3. Where the image tokens learn their own position.
    states, prompt = collections.defaultdict(list), "Output the polygon coordinates of the red shape in the image."
    for image in instances["images"][:400]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=Image.open(image_path(image["id"])).convert("RGB"), text=text, return_tensors="pt")
        image_pos = [k for k, t in enumerate(inputs["input_ids"][0].tolist()) if t == model.config.image_token_id]
        with torch.no_grad():
            hidden = model(**inputs, output_hidden_states=True).hidden_states
        for layer, h in enumerate(hidden):
            states[layer].append(h[0, image_pos])
    cell = torch.arange(16).repeat(400)
    n_train = 300 * 16
    for layer in sorted(states):
        x = torch.cat(states[layer])
        x = (x - x[:n_train].mean(0)) / (x[:n_train].std(0) + 1e-6)
        scores = []
        for y in (cell // 4, cell % 4):
            probe = torch.nn.Linear(x.shape[1], 4)
            opt = torch.optim.Adam(probe.parameters(), 1e-2)
            for _ in range(300):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(probe(x[:n_train]), y[:n_train]).backward()
                opt.step()
            scores.append((probe(x[n_train:]).argmax(1) == y[n_train:]).float().mean().item())
        where = "vision output" if layer == 0 else f"after language layer {layer}"
        print(f"position probe, {where}: row {scores[0]:.3f} column {scores[1]:.3f} (chance 0.25)")


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    here = Path(__file__).resolve().parents[2]
    main(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else here / "models" / "simpleseg-tiny")
