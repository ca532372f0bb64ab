#!/usr/bin/env python3
"""simpleseg vs transformers on the CPU: a prompt with one image, N greedy tokens (end of
sequence ignored). Each engine runs in its own process, one after the other, so that peak RSS
is its own. Reports load time, time to first token (preprocessing + vision tower + prefill),
decode tokens/s and peak RSS, with `lscpu`'s model name and flags above every table.

    .venv-ml/bin/python scripts/bench/bench_engine.py                    # tiny checkpoint, f32
    .venv-ml/bin/python scripts/bench/bench_engine.py --big7b --tokens 32
    .venv-ml/bin/python scripts/bench/bench_engine.py --kimi16b --tokens 32
    .venv-ml/bin/python scripts/bench/bench_engine.py --gemm      # the GEMM row only
    .venv-ml/bin/python scripts/bench/bench_engine.py --kimi-vision  # Kimi-VL's vision tower only
    .venv-ml/bin/python scripts/bench/bench_engine.py --kimi16b-bf16 --tokens 32  # its BF16 rows only

--big7b writes a Qwen2.5-VL-7B-size folder of random BF16 weights (~16.6 GB), quantizes it with
`simpleseg quantize` (q8_0, q4k), times transformers (BF16) and simpleseg (BF16 weights, q8_0,
q4k; 2 threads and 1) on a 640x480 image, then the time to mask (`simpleseg segment` process
start to mask file against transformers' process making as many tokens; --mask-tokens), and
deletes everything.

--kimi16b writes the 16B Kimi-VL size (MoonViT + DeepSeek-V3 MoE, ~32 GB of random BF16),
quantizes it to q4k and times simpleseg on the full quantized model; the BF16 rows (which do not
fit in this machine's memory) are measured per layer: both engines run the full vision tower
with 2 and with 6 language-model layers, and the 27-layer figures are extrapolated linearly
(the 2-layer run + 25 x a quarter of the difference: one mixture layer is ~0.2 s, within one
run's noise), as stated in the table. It also times the vision tower and
projector alone (`examples/bench_vision`) against transformers' tower on the same image size,
in pairs of runs one after the other (their ratios and its median);
--kimi-vision does only that (a ~3.4 GB folder: the tower and 2 language-model layers);
--kimi16b-bf16 only the BF16 rows and the tower (the 2- and 6-layer folders, ~12 GB).

Each engine's folder is read into the page cache just before it runs (the BF16 folder and a
quantized one may not both fit in memory: a cold start would time the disk, and the two
engines map their weights alike).

Random weights give random answers, so every run decodes exactly N tokens; speed does not
depend on the values (the MoE routers are random too: experts are chosen about uniformly).
"""

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
BIN = ROOT / "target/release/simpleseg"
BENCH = ROOT / "target/release/examples/bench_generate"
BENCH_VISION = ROOT / "target/release/examples/bench_vision"
PROMPT = "Output the polygon coordinates of the object in the image."


def cpu_header():
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(re.findall(r"^([^:\n]+):\s*(.*)$", info, re.M))
    return f"CPU: {fields.get('Model name', '?')}, {os.cpu_count()} CPUs\nflags: {fields.get('Flags', '?')}"


def peak_rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class FirstTokenClock:
    """Streamer that notes when generate() hands over the first new token: time to first token
    and decode speed come from one generation, so the prompt is prefilled once."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, _ids):
        # The first call carries the prompt, the second the first generated token.
        self.calls += 1
        if self.calls == 2:
            self.first = time.perf_counter()

    def end(self):
        pass


def timed_generate(model, tokens, **inputs):
    import torch

    clock = FirstTokenClock()
    t1 = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                             streamer=clock)
    t2 = time.perf_counter()
    n = out.shape[1] - (inputs["input_ids"].shape[1] if "input_ids" in inputs else 0)
    decode_ms = max((t2 - clock.first) * 1e3, 1e-6)
    return (clock.first - t1) * 1e3, int(n), decode_ms


def transformers_qwen(model_dir, image, tokens, runs, dtype, threads):
    """transformers' Qwen2.5-VL; inputs built from its tokenizer and (PIL) image processor."""
    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(model_dir, dtype=torch_dtype).eval()
    images = AutoImageProcessor.from_pretrained(model_dir, use_fast=False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    load_ms = (time.perf_counter() - t0) * 1e3
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    result = None
    for _ in range(runs):
        t0 = time.perf_counter()
        pixels = images(images=Image.open(image), return_tensors="pt")
        placeholders = int(pixels["image_grid_thw"].prod()) // images.merge_size ** 2
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = text.replace("<|image_pad|>", "<|image_pad|>" * placeholders)
        ids = tokenizer(text, return_tensors="pt")
        preprocess_ms = (time.perf_counter() - t0) * 1e3
        first_ms, n, decode_ms = timed_generate(model, tokens, **ids, **pixels)
        result = {
            "engine": "transformers", "threads": threads, "load_ms": load_ms, "preprocess_ms": preprocess_ms,
            "prefill_ms": first_ms, "time_to_first_token_ms": preprocess_ms + first_ms,
            "decode_tokens": n, "decode_ms": decode_ms,
            # The n - 1 tokens after the first one.
            "decode_tokens_per_s": (n - 1) / (decode_ms / 1e3),
            "prompt_tokens": int(ids["input_ids"].shape[1]), "peak_rss_mib": peak_rss_mib(),
        }
    return result


def transformers_kimi(folder, tokens, threads, layers=None):
    """transformers' Kimi-K2.5 vision tower + projector and DeepseekV3ForCausalLM at the folder's
    sizes, BF16, randomly initialized (the language model's prompt: the image's merged tokens and
    the text, as the Kimi-VL processor lays them out)."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25Config, Kimi_K25VisionConfig
    from transformers.models.kimi_k25.modeling_kimi_k25 import Kimi_K25MultimodalProjection, Kimi_K25VisionModel

    torch.set_num_threads(threads)
    config = json.loads((Path(folder) / "config.json").read_text())
    v, t = config["vision_config"], config["text_config"]
    if layers:
        t["num_hidden_layers"] = layers
    t0 = time.perf_counter()
    vc = Kimi_K25VisionConfig(
        patch_size=v["patch_size"], pos_emb_height=v["init_pos_emb_height"], pos_emb_width=v["init_pos_emb_width"],
        num_attention_heads=v["num_attention_heads"], num_hidden_layers=v["num_hidden_layers"],
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], hidden_act="gelu_pytorch_tanh",
        merge_kernel_size=v["merge_kernel_size"], rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    vc._attn_implementation = "sdpa"
    torch.set_default_dtype(torch.bfloat16)
    tower = Kimi_K25VisionModel(vc).eval()
    projector = Kimi_K25MultimodalProjection(Kimi_K25Config(
        vision_config=vc.to_dict(), text_config={"model_type": "deepseek_v3", "hidden_size": t["hidden_size"]},
        projection_hidden_size=v["hidden_size"], projection_layer_norm_eps=1e-5)).eval()
    lm = DeepseekV3ForCausalLM(DeepseekV3Config(**{k: x for k, x in t.items() if k != "model_type"})).eval()
    torch.set_default_dtype(torch.float32)
    load_ms = (time.perf_counter() - t0) * 1e3
    # 640x480 in 14-pixel patches, padded to the 2x2 merge grid: 36 x 46 patches.
    grid = (36, 46)
    pixels = torch.randn(grid[0] * grid[1], 3, 14, 14, dtype=torch.bfloat16)
    text_tokens = 30
    t0 = time.perf_counter()
    with torch.no_grad():
        features = projector(tower(pixels, torch.tensor([[1, *grid]])).pooler_output).squeeze(1)
    vision_ms = (time.perf_counter() - t0) * 1e3
    embeds = torch.cat([features.reshape(1, -1, t["hidden_size"]),
                        torch.randn(1, text_tokens, t["hidden_size"], dtype=torch.bfloat16) * 0.02], dim=1)
    first_ms, n, decode_ms = timed_generate(lm, tokens, inputs_embeds=embeds,
                                            attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long))
    return {
        "engine": "transformers", "threads": threads, "load_ms": load_ms, "preprocess_ms": 0.0,
        "vision_ms": vision_ms, "prefill_ms": vision_ms + first_ms, "time_to_first_token_ms": vision_ms + first_ms,
        "decode_tokens": n, "decode_ms": decode_ms, "decode_tokens_per_s": (n - 1) / (decode_ms / 1e3),
        "prompt_tokens": int(embeds.shape[1]), "peak_rss_mib": peak_rss_mib(),
    }


def warm(folder):
    """Reads every file of `folder` once, so that the engine timed next finds its weights in
    the page cache whichever folder ran before (the BF16 folder and a quantized one together
    may not fit in memory; a cold start would time the disk)."""
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 23):
                    pass


def child(kind, *args, cached=False):
    """Runs one engine in its own process, its model folder (the first argument) read into
    the page cache first unless `cached` ([`warm`]); returns its JSON line."""
    if not cached:
        warm(args[0])
    if kind == "simpleseg":
        model, image, tokens, threads, quantize, *rest = args
        dtype, runs = (list(rest) + ["auto", 1][len(rest):])[:2]
        cmd = [str(BENCH), str(model), str(image), str(tokens), dtype, str(runs)] + ([quantize] if quantize else [])
        env = dict(os.environ, RAYON_NUM_THREADS=str(threads))
    else:
        cmd = [sys.executable, __file__, "--child", kind, *map(str, args)]
        env = dict(os.environ)
    out = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])


def build():
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "simpleseg"], cwd=ROOT, check=True)
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "simpleseg-engine", "--example", "bench_generate",
                    "--example", "bench_vision"], cwd=ROOT, check=True)


def vision_child(folder, image, threads, runs=3):
    """simpleseg's vision tower and projector alone (BF16), median of `runs`: its JSON line."""
    out = subprocess.run([str(BENCH_VISION), str(folder), str(image), str(runs), "bf16"], check=True,
                         stdout=subprocess.PIPE, text=True,
                         env=dict(os.environ, RAYON_NUM_THREADS=str(threads))).stdout
    return json.loads(out.strip().splitlines()[-1])


def vision_table(pairs):
    """The Kimi-VL vision tower (and projector) of both engines, 2 threads: `pairs` of
    (transformers' run, simpleseg's median of 3), each pair run one after the other so that both
    engines of a pair meet the same machine (a shared machine's speed drifts between runs)."""
    patches = pairs[0][1]["patches"]
    print(f"\n### Kimi-VL vision tower and projector, BF16, 640x480 image ({patches} patches), "
          f"2 threads\n\n{cpu_header()}\n")
    print("| pair | transformers (sdpa) (s) | simpleseg, median of 3 (s) | simpleseg's share |")
    print("|---|---|---|---|")
    shares = []
    for i, (theirs, ours) in enumerate(pairs):
        shares.append(ours["vision_ms"] / theirs["vision_ms"])
        print(f"| {i + 1} | {theirs['vision_ms'] / 1e3:.2f} | {ours['vision_ms'] / 1e3:.2f} | {shares[-1]:.2f}x |")
    print(f"\nmedian share: {statistics.median(shares):.2f}x")
    print(json.dumps({"pairs": [{"transformers": t, "simpleseg": o} for t, o in pairs]}))


def bench_kimi_vision(args):
    folder = args.work / "bench-kimi-2l"
    try:
        image = kimi_image(args)
        if not folder.exists():
            check_disk(args.work, 5)
            write_random_kimi(folder, 2)
        # transformers' tower with one language-model layer (the tower does not depend on it),
        # three pairs of runs, each in its own process.
        vision_table([(child("transformers-kimi", folder, 2, 2, 1), vision_child(folder, image, 2))
                      for _ in range(3)])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


def quantize(src, fmt, out):
    """`simpleseg quantize`; returns the seconds it took."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([str(BIN), "quantize", "--model", str(src), "--format", fmt, "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def table(title, rows, notes=()):
    """rows: (label, result); ratios against the first row (transformers)."""
    print(f"\n### {title}\n\n{cpu_header()}\n")
    base = rows[0][1]
    print("| | load (s) | time to first token (s) | decode (tokens/s) | peak RSS (GB) |")
    print("|---|---|---|---|---|")
    for label, r in rows:
        def cell(key, scale, higher_better):
            value = r[key] / scale
            if r is base or not base.get(key):
                return f"{value:.2f}"
            ratio = r[key] / base[key] if higher_better else base[key] / r[key]
            return f"{value:.2f} ({ratio:.2f}x)"
        print(f"| {label} | {cell('load_ms', 1e3, False)} | {cell('time_to_first_token_ms', 1e3, False)} "
              f"| {cell('decode_tokens_per_s', 1, True)} | {r['peak_rss_mib'] / 1024:.2f} |")
    for n in notes:
        print(f"\n{n}")
    print("\n(ratio in brackets: how many times better than the first row)")
    print(json.dumps({label: r for label, r in rows}))


def check_disk(path, need_gib):
    free = shutil.disk_usage(path if path.exists() else ROOT).free
    if free < need_gib << 30:
        sys.exit(f"need ~{need_gib} GiB free disk, have {free / 2**30:.1f} GiB")


def save_shards(folder, tensors, shard_bytes=4 << 30):
    """Writes `(name, tensor)` pairs as safetensors shards with an index."""
    from safetensors.torch import save_file

    shard, size, index, n = {}, 0, {}, 0

    def flush():
        nonlocal shard, size, n
        if shard:
            name = f"model-{n:05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            index.update({k: name for k in shard})
            shard, size, n = {}, 0, n + 1

    for k, t in tensors:
        shard[k] = t
        size += t.numel() * t.element_size()
        if size > shard_bytes:
            flush()
    flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": index}))


def random_bf16(shape, gen, norm):
    import torch

    if norm:
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=gen, dtype=torch.float32) * 0.02).to(torch.bfloat16)


def write_random_7b(folder):
    """A Qwen2.5-VL-7B-size folder with random BF16 weights (~16.6 GB), in shards."""
    import torch
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
        # As the released checkpoint's config names it (llama.cpp's converter reads it).
        architectures=["Qwen2_5_VLForConditionalGeneration"],
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Qwen2_5_VLForConditionalGeneration(config).state_dict().items()}
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    norm = lambda k: any(s in k for s in ("norm.weight", "norm1", "norm2", "ln_q", "layernorm"))
    save_shards(folder, ((k, random_bf16(s, gen, norm(k))) for k, s in shapes.items()))
    # The tiny fixture's tokenizer and template: all its ids are smaller than 152064, so prompts
    # tokenize and run; the processor gets Qwen2.5-VL's pixel limits.
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"]:
        shutil.copy(src / f, folder / f)
    pc = json.loads((folder / "processor_config.json").read_text())
    pc["image_processor"]["size"] = {"shortest_edge": 3136, "longest_edge": 12845056}
    (folder / "processor_config.json").write_text(json.dumps(pc))
    (folder / "preprocessor_config.json").write_text(json.dumps(pc["image_processor"]))


def write_random_kimi(folder, text_layers=None):
    """A SimpleSeg-Kimi-VL-size folder (the real checkpoint's 5679 tensor names and shapes, from
    fixtures/kimi/real-tensors.json) with random BF16 weights; with `text_layers`, only that many
    language-model layers. Tokenizer, template and processor files are the tiny fixture's (its
    ids are within the real vocabulary), with the real processor's 4096-token image limit."""
    import torch

    real = json.loads((ROOT / "fixtures/kimi/real-tensors.json").read_text())
    tiny = ROOT / "fixtures/kimi/kimi-tiny"
    config = json.loads((tiny / "config.json").read_text())
    config["vision_config"].update(real["config"]["vision_config"])
    config["text_config"].update(real["config"]["text_config"])
    layers = text_layers or config["text_config"]["num_hidden_layers"]
    config["text_config"]["num_hidden_layers"] = layers
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in tiny.iterdir():
        if f.suffix not in (".safetensors", ".png") and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, folder / f.name)
    pp = json.loads((folder / "preprocessor_config.json").read_text())
    pp["in_token_limit"] = 4096
    (folder / "preprocessor_config.json").write_text(json.dumps(pp))
    gen = torch.Generator().manual_seed(0)
    t = config["text_config"]

    def tensors():
        for name, shape in real["tensors"].items():
            m = re.search(r"layers\.(\d+)\.", name)
            if name.startswith("language_model.") and m and int(m.group(1)) >= layers:
                continue
            if name.endswith("inv_freq"):
                rope = t["qk_rope_head_dim"]
                yield name, 1.0 / (t["rope_theta"] ** (torch.arange(0, rope, 2, dtype=torch.float32) / rope))
            elif name.endswith("e_score_correction_bias"):
                yield name, torch.randn(shape, generator=gen) * 0.01
            else:
                norm = "norm" in name and name.endswith("weight") and len(shape) == 1
                yield name, random_bf16(shape, gen, norm)

    save_shards(folder, tensors())


def bench_7b(args):
    big = args.work / "bench-7b"
    # The BF16 folder (~17 GB, kept from an earlier --keep run or written now) and its q8_0 and
    # q4k copies (~15 GB).
    check_disk(args.work, 16 if big.exists() else 34)
    image = args.work / "image-640x480.png"
    try:
        if not big.exists():
            write_random_7b(big)
        from PIL import Image

        Image.open(args.image).convert("RGB").resize((640, 480), Image.BICUBIC).save(image)
        seconds = {fmt: quantize(big, fmt, args.work / f"bench-7b-{fmt}") for fmt in ("q8_0", "q4k")}
        rows = [("transformers BF16, 2 threads", child("transformers-qwen", big, image, args.tokens, 1, "bf16", 2))]
        for threads in (2, 1):
            rows.append((f"simpleseg BF16 weights, {threads} thread{'s' * (threads > 1)}",
                         child("simpleseg", big, image, args.tokens, threads, None)))
        for fmt in ("q8_0", "q4k"):
            for threads in (2, 1) if fmt == "q4k" else (2,):
                rows.append((f"simpleseg {fmt} (quantized folder), {threads} thread{'s' * (threads > 1)}",
                             child("simpleseg", args.work / f"bench-7b-{fmt}", image, args.tokens, threads, None)))
        table(f"Qwen2.5-VL-7B size, random BF16 weights, 640x480 image, {args.tokens} tokens", rows,
              [f"`simpleseg quantize` took {seconds['q8_0']:.0f} s (q8_0) and {seconds['q4k']:.0f} s (q4k)."])
        if args.mask_tokens:
            time_to_mask(big, args.work / "bench-7b-q4k", image, args.mask_tokens)
    finally:
        if not args.keep:
            for d in (big, args.work / "bench-7b-q8_0", args.work / "bench-7b-q4k"):
                shutil.rmtree(d, ignore_errors=True)


def time_to_mask(big, q4k, image, max_tokens):
    """`simpleseg segment` end to end, process start to mask file, on the BF16 and q4k folders
    (greedy, under the polygon constraint, at most `max_tokens` tokens), beside transformers'
    process (start, imports, load, preprocessing, generation) producing as many tokens as
    simpleseg's BF16 answer. The model card's own parsing and pycocotools rasterization take
    milliseconds and are not added to transformers' time."""
    mask = big.parent / "time-to-mask.png"
    rows = []
    for label, folder in (("simpleseg BF16 weights", big), ("simpleseg q4k folder", q4k)):
        mask.unlink(missing_ok=True)
        warm(folder)
        t0 = time.perf_counter()
        out = subprocess.run(
            [str(BIN), "segment", "--model", str(folder), "--image", str(image), "--query", "the object",
             "--constrain", "polygon", "--greedy", "--max-new-tokens", str(max_tokens), "--mask-out", str(mask),
             "--json"],
            check=True, stdout=subprocess.PIPE, text=True, env=dict(os.environ, RAYON_NUM_THREADS="2")).stdout
        seconds = time.perf_counter() - t0
        if not mask.exists():
            raise SystemExit(f"{label}: segment wrote no mask")
        rows.append((label, json.loads(out)["usage"]["completion_tokens"], seconds))
    tokens = rows[0][1]
    warm(big)
    t0 = time.perf_counter()
    child("transformers-qwen", big, image, tokens, 1, "bf16", 2, cached=True)
    rows.insert(0, ("transformers BF16 (its process, as many tokens)", tokens, time.perf_counter() - t0))
    mask.unlink(missing_ok=True)
    print(f"\n### Time to mask: Qwen2.5-VL-7B size, 640x480 image, polygon constraint, 2 threads\n\n{cpu_header()}\n")
    print("| | answer tokens | process start to mask (s) | ratio to transformers |")
    print("|---|---|---|---|")
    for label, n, seconds in rows:
        print(f"| {label} | {n} | {seconds:.1f} | {seconds / rows[0][2]:.2f}x |")
    print("\n(simpleseg: `segment --constrain polygon --greedy --mask-out`; random weights write a random "
          "polygon. transformers: the benchmark's generation of the same number of tokens, without the "
          "model card's millisecond postprocessing.)")


def bench_gemm():
    """GFLOP/s of `x w^T`: simpleseg's kernels (bench_kernels' prefill case: `bf16_gemm` on
    BF16 operands, `int8_gemm` on the weight quantized to q8_0 and q4k) and torch's BF16 matmul,
    on the same shapes and thread counts."""
    import torch

    subprocess.run(["cargo", "build", "--release", "-q", "-p", "simpleseg-kernels", "--example", "bench_kernels"],
                   cwd=ROOT, check=True)
    kernels = ROOT / "target/release/examples/bench_kernels"
    # (m, k, n): the 7B's 466-token prefill (q/o, gate/up, down) and Qwen2.5-VL's ViT MLP on a
    # 640x480 image's 1564 patches.
    shapes = [(466, 3584, 3584), (466, 3584, 18944), (466, 18944, 3584), (1564, 1280, 3420)]
    print(f"\n### GEMM (GFLOP/s; int8 rows: integer operations per second)\n\n{cpu_header()}\n")
    print("| m x k x n | threads | simpleseg bf16_gemm | simpleseg int8_gemm q8_0 | simpleseg int8_gemm q4k "
          "| torch matmul (BF16) | bf16 ratio | q8_0 ratio | q4k ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for threads in (2, 1):
        torch.set_num_threads(threads)
        for m, k, n in shapes:
            out = subprocess.run([str(kernels), "prefill", str(m), str(k), str(n)], check=True, text=True,
                                 stdout=subprocess.PIPE, env=dict(os.environ, RAYON_NUM_THREADS=str(threads))).stdout
            lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]

            def rate(kernel):
                found = [d.get("gflops") for d in lines if d.get("kernel", "").startswith(kernel)]
                return found[0] if found else None

            ours, q8, q4k = rate("bf16_gemm"), rate("int8_gemm q8_0"), rate("int8_gemm q4k")
            x = torch.randn(m, k).bfloat16()
            w = torch.randn(n, k).bfloat16()
            x @ w.T
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                x @ w.T
                times.append(time.perf_counter() - t0)
            theirs = 2 * m * k * n / sorted(times)[2] / 1e9
            cells = [f"{v:.0f}" if v else "(not on this CPU)" for v in (ours, q8, q4k)]
            ratios = [f"{v / theirs:.2f}x" if v else "-" for v in (ours, q8, q4k)]
            print(f"| {m} x {k} x {n} | {threads} | {' | '.join(cells)} | {theirs:.0f} | {' | '.join(ratios)} |")


# The language-model layer counts of the Kimi-VL size's per-layer runs (the first layer dense,
# the others mixtures of experts): 4 layers apart, so that the per-layer difference stands above
# one run's noise.
KIMI_PARTS = (2, 6)


def extrapolate(ra, rb, layers, na, nb):
    """Figures of a `layers`-layer model from runs with `na` and `nb` layers (the first dense,
    the rest mixtures of experts): the `na`-layer run plus the per-layer difference, and never
    less than the `nb`-layer run's own figure (a load of a few hundredths of a second can
    measure shorter with more layers)."""
    out = dict(rb)
    k = (layers - na) / (nb - na)
    for key in ("load_ms", "time_to_first_token_ms", "peak_rss_mib"):
        out[key] = max(ra[key] + k * (rb[key] - ra[key]), rb[key])
    per_token = lambda r: 1e3 / r["decode_tokens_per_s"]
    out["decode_tokens_per_s"] = 1e3 / (per_token(ra) + k * (per_token(rb) - per_token(ra)))
    out["extrapolated_from"] = {f"{na} layers": ra, f"{nb} layers": rb}
    return out


def kimi_bf16_rows(args, parts, image):
    """The BF16 rows of the Kimi-VL size, per layer: simpleseg on the 2- and 6-layer folders,
    transformers with 2 and 6 layers, each extrapolated to the real layer count; prints the
    vision tower's table on the way. Returns the rows and the layer count."""
    layers = json.loads((ROOT / "fixtures/kimi/real-tensors.json").read_text())["config"]["text_config"][
        "num_hidden_layers"]
    # Each run twice, the faster kept: a per-layer difference is small beside the vision tower,
    # and one slow run (transformers' first tower in a process once took 4.4 s against 2.7)
    # made the extrapolation meaningless.
    def faster(run):
        return min((run() for _ in range(2)), key=lambda r: r["time_to_first_token_ms"])

    measured = {}
    for n, folder in parts.items():
        if not folder.exists():
            write_random_kimi(folder, n)
        # BF16 as the full model would run (auto picks f32 for a folder this small).
        measured[n] = faster(lambda: child("simpleseg", folder, image, args.tokens, 2, None, "bf16"))
    # transformers' models are built in memory (random weights).
    reference = {n: faster(lambda: child("transformers-kimi", parts[2], args.tokens, 2, n)) for n in KIMI_PARTS}
    vision_table([(r, vision_child(parts[2], image, 2)) for r in reference.values()])
    rows = [
        ("transformers BF16 (per layer, extrapolated)", extrapolate(reference[2], reference[6], layers, 2, 6)),
        ("simpleseg BF16 weights (per layer, extrapolated)", extrapolate(measured[2], measured[6], layers, 2, 6)),
    ]
    return rows, layers


def kimi_bf16_note(layers):
    return ("BF16 rows: the full vision tower with a few language-model layers, measured (simpleseg from files, "
            f"transformers in memory: 2 and 6 layers each, the faster of two runs), {layers} layers "
            "extrapolated linearly from the "
            "per-layer difference (load, first token, per-token time, RSS). transformers' models are built "
            "randomly initialized in memory, so its load is not a file load.")


def kimi_image(args):
    from PIL import Image

    image = args.work / "image-640x480.png"
    Image.open(args.image).convert("RGB").resize((640, 480), Image.BICUBIC).save(image)
    return image


def bench_kimi(args):
    full, q4k = args.work / "bench-kimi", args.work / "bench-kimi-q4k"
    parts = {n: args.work / f"bench-kimi-{n}l" for n in KIMI_PARTS}
    # The per-layer folders (~12 GB) go before the full one is written, unless kept.
    check_disk(args.work, 55 if args.keep else 43)
    try:
        image = kimi_image(args)
        rows, layers = kimi_bf16_rows(args, parts, image)
        if not args.keep:
            for d in parts.values():
                shutil.rmtree(d, ignore_errors=True)
        if not full.exists():
            write_random_kimi(full)
        seconds = quantize(full, "q4k", q4k)
        shutil.rmtree(full, ignore_errors=True)
        rows += [
            ("simpleseg q4k (full model, quantized folder), 2 threads", child("simpleseg", q4k, image, args.tokens, 2, None)),
            ("simpleseg q4k (full model, quantized folder), 1 thread", child("simpleseg", q4k, image, args.tokens, 1, None)),
        ]
        table(f"SimpleSeg-Kimi-VL size (16B MoE), random weights, 640x480 image, {args.tokens} tokens", rows, [
            kimi_bf16_note(layers),
            f"`simpleseg quantize --format q4k` on the 32 GB folder took {seconds:.0f} s."])
    finally:
        if not args.keep:
            for d in (full, q4k, *parts.values()):
                shutil.rmtree(d, ignore_errors=True)


def bench_kimi_layers(args):
    """--kimi16b's BF16 rows alone (no full-size folder: ~12 GB of disk instead of ~43)."""
    parts = {n: args.work / f"bench-kimi-{n}l" for n in KIMI_PARTS}
    check_disk(args.work, 13)
    try:
        rows, layers = kimi_bf16_rows(args, parts, kimi_image(args))
        table(f"SimpleSeg-Kimi-VL size (16B MoE) in BF16, per layer, random weights, 640x480 image, "
              f"{args.tokens} tokens", rows, [kimi_bf16_note(layers)])
    finally:
        if not args.keep:
            for d in parts.values():
                shutil.rmtree(d, ignore_errors=True)


def bench_tiny(args):
    kimi = json.loads((args.model / "config.json").read_text()).get("model_type") == "kimi_vl"
    reference = (child("transformers-kimi", args.model, args.tokens, 2) if kimi
                 else child("transformers-qwen", args.model, args.image, args.tokens, args.runs, "f32", 2))
    rows = [("transformers " + ("BF16 (random init, 36x46 patches)" if kimi else "f32"), reference),
            ("simpleseg", child("simpleseg", args.model, args.image, args.tokens, 2, None, "auto", args.runs))]
    table(f"{args.model.name}, {args.tokens} tokens", rows)


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        kind, rest = sys.argv[2], sys.argv[3:]
        if kind == "transformers-qwen":
            model, image, tokens, runs, dtype, threads = rest
            result = transformers_qwen(model, image, int(tokens), int(runs), dtype, int(threads))
        else:
            folder, tokens, threads, *layers = rest
            result = transformers_kimi(folder, int(tokens), int(threads), int(layers[0]) if layers else None)
        print(json.dumps(result))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "fixtures/qwen/nested-window56-untied")
    ap.add_argument("--image", type=Path, default=ROOT / "examples/voc.jpg")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--big7b", action="store_true", help="the 7B size (random weights, written and deleted)")
    ap.add_argument("--kimi16b", action="store_true", help="the 16B Kimi-VL size (random weights, written and deleted)")
    ap.add_argument("--kimi16b-bf16", action="store_true",
                    help="only --kimi16b's BF16 rows, per layer (2- and 6-layer folders, written and deleted; "
                         "no full-size folder)")
    ap.add_argument("--kimi-vision", action="store_true",
                    help="only the Kimi-VL vision tower and projector against transformers' (a folder of the "
                         "tower and 2 language-model layers, written and deleted)")
    ap.add_argument("--work", type=Path, default=ROOT / "target", help="where the big folders are written")
    ap.add_argument("--keep", action="store_true", help="keep the written folders")
    ap.add_argument("--mask-tokens", type=int, default=450,
                    help="with --big7b, the time-to-mask rows' token limit (a 7B answer of ~30 points is "
                         "~450 tokens); 0 skips them")
    ap.add_argument("--gemm", action="store_true",
                    help="only the GEMM row: simpleseg's BF16 GEMM against torch's BF16 matmul on the 7B's "
                         "prefill shapes and a vision-tower MLP shape, 2 threads and 1")
    args = ap.parse_args()
    if args.gemm:
        bench_gemm()
        return
    build()
    if args.big7b:
        bench_7b(args)
    if args.kimi16b:
        bench_kimi(args)
    if args.kimi16b_bf16:
        bench_kimi_layers(args)
    if args.kimi_vision:
        bench_kimi_vision(args)
    if not (args.big7b or args.kimi16b or args.kimi16b_bf16 or args.kimi_vision):
        bench_tiny(args)


if __name__ == "__main__":
    main()
