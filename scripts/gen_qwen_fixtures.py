#!/usr/bin/env python3
"""Regenerates the Qwen2.5-VL parity fixtures in fixtures/qwen/ with transformers.

    python -m venv .venv-ml && .venv-ml/bin/pip install -r scripts/requirements-ml.txt
    .venv-ml/bin/python scripts/gen_qwen_fixtures.py

Builds tiny random-weight `Qwen2_5_VLForConditionalGeneration` checkpoints in both folder
layouts transformers has written (4.x: flat config, `model.layers.*` + `visual.*`; 5.x:
`text_config`, `model.language_model.*` + `model.visual.*`), with a small byte-level BPE
tokenizer carrying the Qwen2.5-VL chat tokens and the Qwen2.5-VL chat template, then records
what transformers computes with its PIL image processor (`use_fast=False`): pixel values, grids,
prompt token ids, logits at every prompt position, and a greedy continuation. Also records
Pillow bicubic resizes and RGBA handling for the resampler tests. Seeded; a rerun writes
identical files.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
import transformers
from transformers import (
    AutoProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "qwen"

# The chat template Qwen2.5-VL-7B-Instruct ships.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
           "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2's pre-tokenizer split.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def build_tokenizer():
    corpus = []
    rng = np.random.default_rng(5)
    words = ("the man in red woman dog cat chair bottle table left right polygon coordinates of "
             "output image locate give tell me help sure you can find it at is a an on with "
             "small large blue green yellow circle square star triangle").split()
    for _ in range(400):
        corpus.append(" ".join(rng.choice(words, 8)))
        pts = ", ".join(f"[{rng.uniform():.3f}, {rng.uniform():.3f}]" for _ in range(4))
        corpus.append(f"[[{pts}]]")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL[1:],
    )
    return fast


def test_image(width, height, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    r = (xx * 255 // max(width - 1, 1)).astype(np.uint8)
    g = (yy * 255 // max(height - 1, 1)).astype(np.uint8)
    b = rng.integers(0, 256, (height, width), dtype=np.uint8)
    arr = np.stack([r, g, b], -1)
    if mode == "RGBA":
        a = rng.integers(0, 256, (height, width), dtype=np.uint8)
        arr = np.concatenate([arr, a[..., None]], -1)
    return Image.fromarray(arr, mode)


def randomize(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm1" in name or "norm2" in name or "ln_q" in name \
                    or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def to_flat_layout(folder):
    """Rewrites a 5.x folder into the 4.x layout: flat config, `model.layers.*`, `visual.*`."""
    config = json.loads((folder / "config.json").read_text())
    text = config.pop("text_config")
    rope = text.pop("rope_parameters", None) or {}
    for k, v in text.items():
        if k not in ("model_type", "architectures", "dtype"):
            config.setdefault(k, v)
    config["rope_theta"] = rope.get("rope_theta", 1000000.0)
    config["rope_scaling"] = {"type": "mrope", "mrope_section": rope.get("mrope_section")}
    config["vision_config"].pop("rope_parameters", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in folder.glob("*.safetensors"):
        tensors = load_file(f)
        renamed = {}
        for k, v in tensors.items():
            k = k.replace("model.language_model.", "model.").replace("model.visual.", "visual.")
            renamed[k] = v
        save_file(renamed, f, metadata={"format": "pt"})
    index = folder / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {
            k.replace("model.language_model.", "model.").replace("model.visual.", "visual."): v
            for k, v in data["weight_map"].items()
        }
        index.write_text(json.dumps(data, indent=2))
    # 4.x processors kept the image processor settings in preprocessor_config.json...
    processor_config = json.loads((folder / "processor_config.json").read_text())
    image = processor_config["image_processor"]
    size = image.pop("size")
    image.update({"min_pixels": size["shortest_edge"], "max_pixels": size["longest_edge"],
                  "processor_class": "Qwen2_5_VLProcessor"})
    (folder / "preprocessor_config.json").write_text(json.dumps(image, indent=2))
    (folder / "processor_config.json").unlink()
    # ...and the template in chat_template.json.
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": jinja.read_text()}))
        jinja.unlink()


def build_case(name, *, window_size, tie, layout, dtype, shard, max_pixels, image, prompt, seed):
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL}
    head_dim = 16
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
            max_position_embeddings=1024,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=4, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=window_size,
            fullatt_block_indexes=[1, 3], tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=tie,
    )
    assert head_dim == config.text_config.hidden_size // config.text_config.num_attention_heads
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    randomize(model, seed)
    if tie:
        model.tie_weights()
    image_processor = Qwen2VLImageProcessorPil(size={"shortest_edge": 56 * 56, "longest_edge": max_pixels})
    processor = Qwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                    video_processor=Qwen2VLVideoProcessor(), chat_template=CHAT_TEMPLATE)
    model.generation_config.do_sample = False
    model.generation_config.repetition_penalty = 1.05
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    save_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model.to(save_dtype).save_pretrained(folder, max_shard_size="150KB" if shard else "50GB")
    processor.save_pretrained(folder)
    if layout == "flat":
        to_flat_layout(folder)
    image.save(folder / "image.png")

    # Reload everything from disk, as a user would, and record transformers' answers.
    processor = AutoProcessor.from_pretrained(folder, use_fast=False)
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    img = Image.open(folder / "image.png")
    inputs = processor(images=img, text=text, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits[0]
        out = model.generate(**inputs, max_new_tokens=24)
    generated = out[0, inputs["input_ids"].shape[1]:]
    # Greedy parity is only meaningful where the choice is not a near-tie.
    margins = greedy_margins(model, inputs, generated)
    assert min(margins) > 1e-3, f"{name}: near-tie in greedy decoding ({min(margins)})"
    save_file({
        "input_ids": inputs["input_ids"][0].to(torch.int64).contiguous(),
        "pixel_values": inputs["pixel_values"].contiguous(),
        "image_grid_thw": inputs["image_grid_thw"].to(torch.int64).contiguous(),
        "logits": logits.contiguous(),
        "greedy_ids": generated.to(torch.int64).contiguous(),
    }, OUT / f"{name}.expected.safetensors")
    (OUT / f"{name}.expected.json").write_text(json.dumps({
        "prompt": prompt,
        "text": text,
        "greedy_text": processor.batch_decode(generated[None], skip_special_tokens=True)[0],
        "layout": layout,
        "dtype": dtype,
        "window_size": window_size,
        "tie_word_embeddings": tie,
        "min_greedy_margin": float(min(margins)),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }, indent=2))
    print(f"{name}: grid {inputs['image_grid_thw'].tolist()}, {inputs['input_ids'].shape[1]} prompt tokens, "
          f"greedy {generated.tolist()}")


def greedy_margins(model, inputs, generated):
    """Gap between the best and second-best processed score at each greedy step."""
    margins = []
    ids = inputs["input_ids"]
    for step in range(len(generated)):
        seq = torch.cat([ids, generated[None, :step]], 1)
        with torch.no_grad():
            scores = model(**{**inputs, "input_ids": seq, "attention_mask": torch.ones_like(seq),
                              "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"],
                                                              torch.zeros(1, step, dtype=torch.int64)], 1)
                              if "mm_token_type_ids" in inputs else None}).logits[0, -1]
        penalty = model.generation_config.repetition_penalty
        s = scores.clone()
        prev = torch.unique(seq[0])
        sel = s[prev]
        s[prev] = torch.where(sel < 0, sel * penalty, sel / penalty)
        top = torch.topk(s, 2).values
        margins.append(float(top[0] - top[1]))
    return margins


def resize_fixtures():
    """Pillow bicubic resizes of synthetic images and of the bundled photo (decoded by Pillow,
    kept as voc.png so the JPEG decoders can be compared too)."""
    out = OUT / "resize"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    cases = []
    photo = Image.open(ROOT / "examples/voc.jpg").convert("RGB")
    photo.save(out / "voc.png")
    crop = photo.crop((200, 100, 296, 172))
    crop.save(out / "voc_crop.png")
    sources = {"voc.png": photo, "voc_crop.png": crop, "synthetic.png": test_image(97, 61, 1)}
    sources["synthetic.png"].save(out / "synthetic.png")
    targets = {"voc.png": [(224, 168), (100, 300), (28, 28)],
               "voc_crop.png": [(200, 150), (97, 310), (96, 30)],
               "synthetic.png": [(56, 28), (200, 120), (97, 30), (40, 61), (1, 1), (300, 5)]}
    for src, sizes in targets.items():
        for w, h in sizes:
            name = f"{Path(src).stem}_{w}x{h}.png"
            sources[src].resize((w, h), Image.BICUBIC).save(out / name)
            cases.append({"source": src, "width": w, "height": h, "expected": name})
    rgba = test_image(30, 20, 9, "RGBA")
    rgba.save(out / "rgba.png")
    from transformers.image_transforms import convert_to_rgb
    Image.fromarray(convert_to_rgb(rgba, return_numpy=True)).save(out / "rgba_on_white.png")
    (out / "cases.json").write_text(json.dumps({"pillow": Image.__version__, "cases": cases}, indent=2))


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    resize_fixtures()
    build_case("flat-window112-tied", window_size=112, tie=True, layout="flat", dtype="f32", shard=False,
               max_pixels=28 * 28 * 12, image=test_image(200, 150, 2),
               prompt="Output the polygon coordinates of the man in red in the image.", seed=11)
    build_case("nested-window56-untied", window_size=56, tie=False, layout="nested", dtype="bf16", shard=True,
               max_pixels=28 * 28 * 64, image=test_image(171, 97, 3),
               prompt="Locate the polygon of the small blue circle.", seed=12)
