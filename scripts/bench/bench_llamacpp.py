#!/usr/bin/env python3
"""llama.cpp's text decode at Q4_K_M on the language model of a Qwen2.5-VL folder (the 7B-size
random folder `scripts/bench/bench_engine.py --big7b --keep` writes): the llama.cpp row of the
real-size benchmark, to set beside `bench_engine.py`'s simpleseg q4k row on the same folder.

    pip install llama-cpp-python gguf numpy    # llama.cpp builds from source (cmake from PyPI)
    python scripts/bench/bench_llamacpp.py --model target/bench-7b --work target --tokens 32

The language model's tensors are written to a BF16 GGUF under llama.cpp's qwen2 names (the
same values), quantized to Q4_K_M by llama.cpp itself (`llama_model_quantize`), then timed:
a 466-token prompt (the length of the 640x480 image prompt) and 32 greedy tokens, on 2 and 1
threads. The vocabulary is a placeholder of the embedding's size: tokens are fed as ids, so
no text is tokenized. Prints one JSON line per run.
"""

import argparse
import ctypes
import json
import os
import time
from pathlib import Path

import numpy as np


def peak_rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def read_safetensors(path):
    """(name, (dtype, shape, raw uint16 data)) of a safetensors file, memory-mapped."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        start, end = meta["data_offsets"]
        yield name, (meta["dtype"], meta["shape"], data[start:end].view(np.uint16))


def write_gguf(model, out):
    """The folder's language model as a BF16 GGUF with llama.cpp's qwen2 tensor names."""
    import gguf

    config = json.loads((model / "config.json").read_text())
    t = config.get("text_config", config)
    names = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                 "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}

    def gguf_name(name):
        for prefix in ("model.language_model.", "model.", "language_model.model.", "language_model."):
            if name.startswith(prefix) and ".visual" not in name:
                rest = name[len(prefix):]
                break
        else:
            return "output.weight" if name == "lm_head.weight" else None
        if rest == "lm_head.weight":
            return "output.weight"
        if rest in names:
            return names[rest]
        if rest.startswith("layers."):
            _, i, *parts = rest.split(".")
            stem, kind = ".".join(parts[:-1]), parts[-1]
            if stem in per_layer:
                return f"blk.{i}.{per_layer[stem]}.{kind}"
        return None

    w = gguf.GGUFWriter(str(out), "qwen2")
    w.add_context_length(32768)
    w.add_embedding_length(t["hidden_size"])
    w.add_feed_forward_length(t["intermediate_size"])
    w.add_block_count(t["num_hidden_layers"])
    w.add_head_count(t["num_attention_heads"])
    w.add_head_count_kv(t["num_key_value_heads"])
    w.add_rope_freq_base(float(t.get("rope_theta", t.get("rope_parameters", {}).get("rope_theta", 1e6))))
    w.add_layer_norm_rms_eps(t.get("rms_norm_eps", 1e-6))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    vocab = t["vocab_size"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_types([gguf.TokenType.NORMAL] * vocab)
    w.add_token_merges(["<t2> <t3>"])  # one placeholder: llama.cpp requires the key
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    count = 0
    for shard in sorted(model.glob("*.safetensors")):
        for name, (dtype, shape, data) in read_safetensors(shard):
            target = gguf_name(name)
            if target is None:
                continue
            if dtype == "F32":
                w.add_tensor(target, data.view(np.float32).reshape(shape))
            elif dtype != "BF16":
                raise SystemExit(f"{name}: {dtype}, expected BF16 or F32")
            elif len(shape) == 1:  # norms and biases in f32, as llama.cpp's converter writes them
                f32 = (data.astype(np.uint32) << 16).view(np.float32)
                w.add_tensor(target, f32)
            else:
                w.add_tensor(target, data.reshape(shape), raw_shape=shape,
                             raw_dtype=gguf.GGMLQuantizationType.BF16)
            count += 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return count


def quantize_q4_k_m(src, dst, threads):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"llama_model_quantize failed ({rc})")


def run(model, tokens, threads, prompt_tokens):
    from llama_cpp import Llama

    t0 = time.perf_counter()
    llm = Llama(model_path=str(model), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                n_batch=512, use_mmap=True, verbose=False)
    load_ms = (time.perf_counter() - t0) * 1e3
    prompt = [(17 * i + 3) % 150000 + 2 for i in range(prompt_tokens)]
    t0 = time.perf_counter()
    llm.eval(prompt)
    first = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    prefill_ms = (time.perf_counter() - t0) * 1e3
    t0 = time.perf_counter()
    token = first
    for _ in range(tokens - 1):
        llm.eval([token])
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    decode_ms = (time.perf_counter() - t0) * 1e3
    return {"engine": "llama.cpp Q4_K_M", "threads": threads, "load_ms": load_ms,
            "prefill_ms": prefill_ms, "prompt_tokens": prompt_tokens, "decode_tokens": tokens,
            "decode_ms": decode_ms, "decode_tokens_per_s": (tokens - 1) / (decode_ms / 1e3),
            "peak_rss_mib": peak_rss_mib()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("target"))
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=466)
    ap.add_argument("--threads", type=int, default=0, help="only this thread count (default: 2 then 1)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    q4 = args.work / "bench-7b-llamacpp-q4_k_m.gguf"
    if args.child:
        print(json.dumps(run(q4, args.tokens, args.threads, args.prompt_tokens)))
        return
    bf16 = args.work / "bench-7b-llamacpp-bf16.gguf"
    if not q4.exists():
        t0 = time.perf_counter()
        n = write_gguf(args.model, bf16)
        print(f"wrote {n} tensors to {bf16} in {time.perf_counter() - t0:.0f} s", flush=True)
        t0 = time.perf_counter()
        quantize_q4_k_m(bf16, q4, os.cpu_count())
        print(f"llama.cpp Q4_K_M quantization: {time.perf_counter() - t0:.0f} s", flush=True)
        bf16.unlink()
    import subprocess
    import sys

    for threads in ([args.threads] if args.threads else [2, 1]):
        out = subprocess.run([sys.executable, __file__, "--child", "--model", str(args.model), "--work",
                              str(args.work), "--tokens", str(args.tokens), "--prompt-tokens",
                              str(args.prompt_tokens), "--threads", str(threads)],
                             check=True, stdout=subprocess.PIPE, text=True).stdout
        print(out.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
