#!/usr/bin/env python3
"""llama.cpp's time to first token *with the image* and its time to N tokens, on the same
Qwen2.5-VL folder as `bench_engine.py`'s 7B rows (`bench_engine.py --big7b --keep` writes
target/bench-7b), converted by llama.cpp's own converter: the llama.cpp row to set beside
simpleseg's first token and time to mask.

llama.cpp is the tree vendored in llama-cpp-python's source package, built for this CPU:

    pip download --no-deps --no-binary llama-cpp-python llama-cpp-python -d /tmp/ll
    tar xzf /tmp/ll/llama_cpp_python-*.tar.gz -C /tmp/ll
    SRC=$(echo /tmp/ll/llama_cpp_python-*/vendor/llama.cpp)
    cmake -S $SRC -B $SRC/build -DGGML_NATIVE=ON -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_OPENSSL=OFF
    cmake --build $SRC/build -j2 --target llama-mtmd-cli llama-quantize
    .venv-ml/bin/pip install --target /tmp/ll/pydeps sentencepiece   # the converter imports it
    PYTHONPATH=/tmp/ll/pydeps .venv-ml/bin/python scripts/bench/bench_llamacpp_image.py \\
        --model target/bench-7b --llama-cpp $SRC --image target/image-640x480.png --work target

What it does:
1. `convert_hf_to_gguf.py` writes the language model (`--outtype q8_0` by default: a BF16 GGUF
   of the 7B size needs 15 GB more disk) and, with `--mmproj`, the vision tower and merger
   (`--mmproj-type`, f16 by default, the converter's own default and the form llama.cpp's
   Qwen2.5-VL projectors are published in; vision tensors saved by transformers 5 as
   `model.visual.*` are first copied under the released `visual.*` names the converter's
   projector code reads). `llama-quantize` then makes Q4_K_M
   (`--allow-requantize` from q8_0). The benchmark folders carry a small test tokenizer whose
   vocabulary llama.cpp's pre-tokenizer check (a hash of a sample's tokens) cannot know; its
   pre-tokenizer is Qwen2's own regex, so the converter is told `qwen2` instead of stopping.
2. `llama-mtmd-cli` runs the image and bench_engine's prompt, greedy, on T threads: once for one
   token (the first-token row) and once for `--tokens` tokens with the end token ignored (the
   time-to-mask row: process start to the last token). From its log: the loading (model,
   projector, context) ends at the tool's banner, and the first token is the one-token run's
   time from there to the performance summary printed after the last token; the image's
   encoding, the prompt's prefill and the token counts are printed beside it. One JSON line per
   run.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Output the polygon coordinates of the object in the image."

# Runs the vendored converter with the pre-tokenizer named (see the module's docstring).
CONVERT = """
import runpy, sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(src, model, out, *extra):
    """The converter's output, written under a temporary name so that a failed run leaves none."""
    if out.exists():
        print(f"{out} exists, kept", file=sys.stderr)
        return
    partial = out.with_suffix(".partial")
    subprocess.run([sys.executable, "-c", CONVERT, str(src), str(model), "--outfile", str(partial), *extra],
                   check=True)
    partial.rename(out)


def released_vision_names(model, work):
    """A folder with `model`'s vision tensors under the released checkpoint's names
    (`visual.*`), which the converter's projector code expects, or `model` itself when they
    already are. transformers 5 saves them as `model.visual.*` (bench_engine's folders)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    shards = sorted(model.glob("*.safetensors"))
    nested = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            nested.update({name: shard for name in f.keys() if name.startswith("model.visual.")})
    if not nested:
        return model
    out = work / "llamacpp-vision-names"
    out.mkdir(exist_ok=True)
    tensors = {}
    for name, shard in nested.items():
        with safe_open(shard, "pt") as f:
            tensors[name[len("model."):]] = f.get_tensor(name)
    save_file(tensors, str(out / "model.safetensors"))
    for f in model.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json" and f.is_file():
            (out / f.name).write_bytes(f.read_bytes())
    return out


def run(src, build, lm, mmproj, image, threads, tokens):
    """One `llama-mtmd-cli` run: its wall time and the timings its log reports (ms)."""
    cmd = [str(build / "bin/llama-mtmd-cli"), "-m", str(lm), "--mmproj", str(mmproj), "--image", str(image),
           "-p", PROMPT, "-n", str(tokens), "-t", str(threads), "-tb", str(threads), "--temp", "0",
           "-c", "4096", "--ignore-eos", "--no-warmup", "--perf", "-v"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, errors="replace")
    wall_ms = (time.perf_counter() - t0) * 1e3
    if done.returncode != 0:
        raise SystemExit(f"llama-mtmd-cli failed ({done.returncode}):\n{done.stderr[-3000:]}")
    log = done.stdout + done.stderr

    def ms(pattern):
        found = re.findall(pattern, log)
        return sum(float(v) for v in found) if found else None

    def stamp(marker):
        # Log lines start with minutes.seconds.milliseconds.microseconds since the process began.
        found = re.search(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) .*" + marker, log, re.M)
        if not found:
            raise SystemExit(f"llama-mtmd-cli's log has no {marker!r} line:\n{log[-3000:]}")
        m, sec, milli, micro = map(int, found.groups())
        return (m * 60 + sec) * 1e3 + milli + micro / 1e3

    # Loading (model, projector, context) ends where the tool prints its banner; the performance
    # summary is printed right after the last token.
    ready_ms, last_token_ms = stamp("experimental CLI"), stamp("llama_perf_context_print")
    return {
        "wall_ms": wall_ms,
        "load_ms": ready_ms,
        "ready_to_last_token_ms": last_token_ms - ready_ms,
        "image_encode_ms": ms(r"mtmd batch encoding done in (\d+) ms"),
        "image_tokens": ms(r"encoding batch with \d+ entries and total (\d+) tokens"),
        "image_decode_ms": ms(r"image decoded \(batch \d+/\d+\) in (\d+) ms"),
        "prompt_eval_ms": ms(r"prompt eval time\s*=\s*([\d.]+) ms"),
        "prompt_tokens": ms(r"prompt eval time\s*=\s*[\d.]+ ms /\s*(\d+) tokens"),
        "eval_ms": ms(r"\beval time\s*=\s*([\d.]+) ms /\s*\d+ runs"),
        "eval_runs": ms(r"\beval time\s*=\s*[\d.]+ ms /\s*(\d+) runs"),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a Qwen2.5-VL folder (BF16 safetensors)")
    ap.add_argument("--llama-cpp", type=Path, required=True,
                    help="llama.cpp's source tree (llama-cpp-python's vendor/llama.cpp)")
    ap.add_argument("--build", type=Path, help="its cmake build folder (default: SRC/build)")
    ap.add_argument("--image", type=Path, required=True, help="the image (bench_engine's 640x480 PNG)")
    ap.add_argument("--work", type=Path, required=True, help="where the GGUF files are written")
    ap.add_argument("--outtype", default="q8_0", help="the converter's type for the language model")
    ap.add_argument("--mmproj-type", default="f16", help="the converter's type for the vision tower")
    ap.add_argument("--tokens", type=int, default=174,
                    help="tokens of the time-to-mask run (simpleseg q4k's answer length; 0 skips it)")
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--keep", action="store_true", help="keep the GGUF files")
    args = ap.parse_args()
    build = args.build or args.llama_cpp / "build"
    lm_src = args.work / f"llamacpp-lm-{args.outtype}.gguf"
    lm = args.work / "llamacpp-lm-Q4_K_M.gguf"
    mmproj = args.work / f"llamacpp-mmproj-{args.mmproj_type}.gguf"
    try:
        t0 = time.perf_counter()
        if not mmproj.exists():
            vision = released_vision_names(args.model, args.work)
            convert(args.llama_cpp, vision, mmproj, "--mmproj", "--outtype", args.mmproj_type)
            if vision != args.model:
                shutil.rmtree(vision)
        if not lm.exists():
            convert(args.llama_cpp, args.model, lm_src, "--outtype", args.outtype)
            subprocess.run([str(build / "bin/llama-quantize"), "--allow-requantize", str(lm_src), str(lm),
                            "Q4_K_M", str(os.cpu_count())], check=True, stdout=subprocess.DEVNULL)
            lm_src.unlink()
        print(json.dumps({"conversion_s": time.perf_counter() - t0,
                          "lm_gb": lm.stat().st_size / 1e9, "mmproj_gb": mmproj.stat().st_size / 1e9}))
        for threads in args.threads:
            first = run(args.llama_cpp, build, lm, mmproj, args.image, threads, 1)
            print(json.dumps({"run": "first token", "threads": threads,
                              "time_to_first_token_ms": first["ready_to_last_token_ms"], **first}))
            if args.tokens:
                full = run(args.llama_cpp, build, lm, mmproj, args.image, threads, args.tokens)
                print(json.dumps({"run": "time to mask", "threads": threads, "tokens": args.tokens,
                                  "process_start_to_last_token_ms": full["wall_ms"], **full}))
    finally:
        if not args.keep:
            for f in (lm_src, lm, mmproj):
                f.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
