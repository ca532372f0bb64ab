#!/usr/bin/env python3
"""simpleseg vs transformers on one Qwen2.5-VL checkpoint: prompt with one image, N greedy
tokens (end-of-sequence ignored), both on this machine's CPU, one after the other.

    .venv-ml/bin/python scripts/bench_engine.py --model fixtures/qwen/nested-window56-untied \
        --image examples/voc.jpg --tokens 64 --runs 3
    .venv-ml/bin/python scripts/bench_engine.py --big7b --tokens 32   # writes, times, deletes a random 7B

Reports time to first token (preprocessing + vision tower + prefill), decode tokens/s, load
time and peak RSS of each engine, and the ratios. Each engine runs in its own process so that
peak RSS is its own.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def transformers_run(model_dir, image, tokens, runs, dtype):
    import resource

    import torch
    from PIL import Image
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype).eval()
    processor = AutoProcessor.from_pretrained(model_dir, use_fast=False)
    load_ms = (time.perf_counter() - t0) * 1e3
    messages = [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "Output the polygon coordinates of the object in the image."}]}]
    class FirstTokenClock:
        """Streamer that notes when generate() hands over the first new token: time to first
        token and decode speed come from one generation, so the prompt is prefilled once."""

        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, _ids):
            # The first call carries the prompt, the second the first generated token.
            self.calls += 1
            if self.calls == 2:
                self.first = time.perf_counter()

        def end(self):
            pass

    result = None
    for _ in range(runs):
        t0 = time.perf_counter()
        img = Image.open(image)
        text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        inputs = processor(images=img, text=text, return_tensors="pt")
        preprocess_ms = (time.perf_counter() - t0) * 1e3
        clock = FirstTokenClock()
        t1 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 streamer=clock)
        t2 = time.perf_counter()
        n = out.shape[1] - inputs["input_ids"].shape[1]
        first_ms = (clock.first - t1) * 1e3
        decode_ms = max((t2 - clock.first) * 1e3, 1e-6)
        result = {
            "engine": "transformers",
            "load_ms": load_ms,
            "preprocess_ms": preprocess_ms,
            "prefill_ms": first_ms,
            "time_to_first_token_ms": preprocess_ms + first_ms,
            "decode_tokens": int(n),
            "decode_ms": decode_ms,
            # The n - 1 tokens after the first one.
            "decode_tokens_per_s": (n - 1) / (decode_ms / 1e3),
            "prompt_tokens": int(inputs["input_ids"].shape[1]),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
    return result


def simpleseg_run(model_dir, image, tokens, runs, dtype):
    cmd = ["cargo", "run", "--release", "-q", "-p", "simpleseg-engine", "--example", "bench_generate", "--",
           str(model_dir), str(image), str(tokens), dtype, str(runs)]
    # stderr passes through, so a failure shows its message.
    out = subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(ours, theirs):
    rows = [
        ("load (ms)", "load_ms", False),
        ("time to first token (ms)", "time_to_first_token_ms", False),
        ("decode (tokens/s)", "decode_tokens_per_s", True),
        ("peak RSS (MiB)", "peak_rss_mib", False),
    ]
    print(f"{'':28} {'transformers':>14} {'simpleseg':>12} {'ratio':>8}")
    for name, key, higher_better in rows:
        t, s = theirs[key], ours[key]
        ratio = (s / t) if higher_better else (t / s)
        print(f"{name:28} {t:14.2f} {s:12.2f} {ratio:7.1f}x")
    print(json.dumps({"transformers": theirs, "simpleseg": ours}))


def write_random_7b(folder):
    """A Qwen2.5-VL-7B-size folder with random BF16 weights (~16.6 GB), in shards."""
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    src = ROOT / "fixtures/qwen/nested-window56-untied"
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                          "mrope_section": [16, 24, 24]}),
        vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                           out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31]),
        # The tokenizer is the tiny fixture's (a Qwen-size one is not needed to time the model),
        # so the special token ids are its ids; the embedding still has Qwen's 152064 rows.
        **{k: v for k, v in json.loads((src / "config.json").read_text()).items()
           if k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")},
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        shapes = {k: (v.shape, v.dtype) for k, v in Qwen2_5_VLForConditionalGeneration(config).state_dict().items()}
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    shard, size, index, n = {}, 0, {}, 0
    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            for k in shard:
                index[k] = name
            shard, size, n = {}, 0, n + 1
    for k, (shape, _) in shapes.items():
        t = (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)
        if k.endswith("norm.weight") or "norm1" in k or "norm2" in k or "ln_q" in k or "layernorm" in k:
            t = torch.ones(shape, dtype=torch.bfloat16)
        shard[k] = t
        size += t.numel() * 2
        if size > 4 << 30:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))
    # The tiny fixture's tokenizer and template: all its ids are smaller than 152064, so prompts
    # tokenize and run; the processor gets Qwen2.5-VL's pixel limits.
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"]:
        shutil.copy(src / f, folder / f)
    pc = json.loads((folder / "processor_config.json").read_text())
    pc["image_processor"]["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
    (folder / "processor_config.json").write_text(json.dumps(pc))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "fixtures/qwen/nested-window56-untied")
    ap.add_argument("--image", type=Path, default=ROOT / "examples/voc.jpg")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--big7b", action="store_true", help="write, time and delete a random-weight 7B folder")
    ap.add_argument("--big-dir", type=Path, default=ROOT / "target/bench-7b")
    ap.add_argument("--engine", choices=["both", "simpleseg", "transformers"], default="both")
    args = ap.parse_args()
    if args.big7b:
        free = shutil.disk_usage(args.big_dir.parent if args.big_dir.parent.exists() else ROOT).free
        if free < 17 << 30:
            sys.exit(f"need ~17 GiB free disk for the 7B weights, have {free / 2**30:.1f} GiB")
        if not args.big_dir.exists():
            write_random_7b(args.big_dir)
        # The 7B figures are for a 640x480 image: the chosen one, resized to that size.
        from PIL import Image

        image = args.big_dir / "image-640x480.png"
        Image.open(args.image).convert("RGB").resize((640, 480), Image.BICUBIC).save(image)
        args.image = image
        model, dtype, runs = args.big_dir, "bf16", 1
    else:
        model, dtype, runs = args.model, "f32", args.runs
    try:
        ours = simpleseg_run(model, args.image, args.tokens, runs, dtype if args.big7b else "auto") \
            if args.engine != "transformers" else None
        theirs = transformers_run(model, args.image, args.tokens, runs, dtype) if args.engine != "simpleseg" else None
        if ours and theirs:
            report(ours, theirs)
        else:
            print(json.dumps(ours or theirs))
    finally:
        if args.big7b:
            shutil.rmtree(args.big_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
