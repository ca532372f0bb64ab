#!/usr/bin/env python3
"""Regenerates the Kimi-VL parity fixtures in fixtures/kimi/.

    python -m venv .venv-ml && .venv-ml/bin/pip install -r scripts/requirements-ml.txt
    .venv-ml/bin/pip install --no-deps nemo_automodel==0.7.0
    .venv-ml/bin/python scripts/gen_kimi_fixtures.py

Builds tiny random-weight Kimi-VL checkpoints in the real layout (`config.json` with a MoonViT
`vision_config` and a DeepSeek-V3 `text_config`; sharded safetensors in BF16 with F32
`e_score_correction_bias` and the per-layer `rotary_emb.inv_freq` the original checkpoint
carries; `tiktoken.model` + `tokenizer_config.json`; a Kimi chat template;
`preprocessor_config.json`), with a router bias that changes the chosen experts, and records
what two independent implementations compute on them:

- vision tower and projector: transformers' `Kimi_K25VisionModel` + `Kimi_K25MultimodalProjection`
  (weights converted: `wqkv` split and its query/key rows de-interleaved, renamed), and NVIDIA
  NeMo Automodel's `MoonVitPretrainedModel` + `KimiVLMultiModalProjector` (the original layout,
  complex-number rotary); the two must agree within 1e-5;
- language model: transformers' `DeepseekV3ForCausalLM` (loaded from the per-expert names) and
  NeMo's `KimiVLForConditionalGeneration` (its own MLA and MoE); prompt logits must agree
  within 1e-4;
- the processor (PIL bicubic resize, zero padding, to_tensor/normalize semantics, row-major
  patches) and the tokenizer (tiktoken with Kimi's split regex and the wrapper's run cutting),
  computed with PIL, torch and tiktoken;
- a greedy continuation from transformers' `generate`.

Also writes `kimi/real-tensors.json`: every tensor name and shape of the real 16B checkpoint, as
NeMo's state-dict adapter names them for the real config (built on the meta device), plus the
27 rotary `inv_freq` buffers the original checkpoint stores. Seeded; a rerun writes identical
files.
"""

import base64
import json
import math
import shutil
import tempfile
from pathlib import Path

import jinja2
import numpy as np
import tiktoken
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file
from tiktoken import _educational as tiktoken_training
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25Config, Kimi_K25VisionConfig
from transformers.models.kimi_k25.modeling_kimi_k25 import (
    Kimi_K25MultimodalProjection,
    Kimi_K25VisionModel,
)

from nemo_automodel.components.models.common import BackendConfig
from nemo_automodel.components.models.kimivl.model import (
    KimiVLConfig,
    KimiVLForConditionalGeneration,
    KimiVLMultiModalProjector,
    MoonVitPretrainedModel,
)

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "kimi"

# Kimi's pre-tokenization regex (Moonshot's TikTokenTokenizer.pat_str).
KIMI_PATTERN = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])
RESERVED = 256 + 2
MAX_ENCODE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

# Special tokens by offset from the base vocabulary, as the real checkpoint places them
# (163584 = [BOS], 163585 = [EOS], ..., 163602-163605 = the media tokens).
SPECIALS = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
            6: "<|start_header_id|>", 7: "<|end_header_id|>", 12: "[EOT]", 13: "<|im_system|>",
            17: "<|im_middle|>", 18: "<|media_start|>", 19: "<|media_content|>", 20: "<|media_end|>",
            21: "<|media_pad|>"}

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and messages[0]['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}<|im_system|>"
    "{%- elif message['role'] == 'user' -%}<|im_user|>"
    "{%- else -%}<|im_assistant|>{%- endif -%}"
    "{{ message['role'] }}<|im_middle|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content -%}"
    "<|media_start|>image<|media_content|><|media_pad|><|media_end|>"
    "{%- else -%}{{ content['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)

CORPUS = (
    "Output the polygon coordinates of the red shape in the image. "
    "Output the polygon coordinates of the dog on the left in the image. "
    "[[[0.625, 0.208], [0.5, 0.21], [0.394, 0.333], [0.41, 0.702], [0.713, 0.75]]] "
    "What is the polygon of the man in red? Sure, you can find it at [[[0.1, 0.2], [0.3, 0.4]]]. "
    "system user assistant image You are a helpful assistant 0123456789 "
) * 3

VISION = dict(patch_size=14, init_pos_emb_height=6, init_pos_emb_width=6, num_attention_heads=2,
              num_hidden_layers=2, hidden_size=32, intermediate_size=48, merge_kernel_size=[2, 2])


def text_config(vocab_size, grouped):
    """Kimi-VL's text settings scaled down; `grouped` adds DeepSeek-V3's query low-rank and
    group-limited routing, which Kimi-VL leaves off."""
    return dict(
        model_type="deepseek_v3", vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
        moe_intermediate_size=24, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        n_shared_experts=1 if grouped else 2, n_routed_experts=8, num_experts_per_tok=2,
        routed_scaling_factor=2.446, n_group=2 if grouped else 1, topk_group=1,
        norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
        first_k_dense_replace=1, moe_layer_freq=1, kv_lora_rank=16,
        q_lora_rank=12 if grouped else None, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, rms_norm_eps=1e-5, rope_theta=800000.0, rope_scaling=None,
        max_position_embeddings=4096, hidden_act="silu", tie_word_embeddings=False,
        attention_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )


# ---------------------------------------------------------------------------------------------
# Tokenizer


def train_ranks():
    ranks = tiktoken_training.bpe_train(CORPUS, 380, r"""\s?\w+|\s?[^\w\s]+|\s+""", visualise=None)
    return dict(sorted(ranks.items(), key=lambda kv: kv[1]))


def tokenizer(ranks):
    base = len(ranks)
    names = {base + i: SPECIALS.get(i, f"<|reserved_token_{base + i}|>") for i in range(RESERVED)}
    encoding = tiktoken.Encoding(name="kimi-tiny", pat_str=KIMI_PATTERN, mergeable_ranks=ranks,
                                 special_tokens={v: k for k, v in names.items()})
    return encoding, names


def split_runs(s, limit):
    """The wrapper's `_split_whitespaces_or_nonwhitespaces`."""
    current, is_space, start = 0, s[0].isspace() if s else False, 0
    for i, c in enumerate(s):
        now = c.isspace()
        if is_space ^ now:
            current, is_space = 1, now
        else:
            current += 1
            if current > limit:
                yield s[start:i]
                start, current = i, 1
    yield s[start:]


def encode(encoding, text):
    ids = []
    for i in range(0, max(len(text), 1), MAX_ENCODE_CHARS):
        for piece in split_runs(text[i:i + MAX_ENCODE_CHARS], MAX_RUN_CHARS):
            ids.extend(encoding.encode(piece, allowed_special="all"))
    return ids


def render(prompt):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    return env.from_string(CHAT_TEMPLATE).render(messages=messages, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------
# Processor


def preprocess(image, patch, merge, limit, pad_input, mean, std):
    w, h = image.size
    if (w // patch) * (h // patch) > limit:
        scale = math.sqrt(limit / ((w // patch) * (h // patch)))
        image = image.resize((int(w * scale), int(h * scale)), Image.Resampling.BICUBIC)
    nw, nh = image.size
    if pad_input:
        ph, pw = (merge[0] * patch - nh % (merge[0] * patch)) % (merge[0] * patch), \
            (merge[1] * patch - nw % (merge[1] * patch)) % (merge[1] * patch)
        if ph or pw:
            padded = Image.new(image.mode, (nw + pw, nh + ph), (0, 0, 0))
            padded.paste(image, (0, 0))
            image = padded
    w, h = image.size
    assert w // patch < 512 and h // patch < 512
    tensor = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).float().div(255)
    tensor = (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    c, hh, ww = tensor.shape
    patches = tensor.reshape(c, hh // patch, patch, ww // patch, patch).permute(1, 3, 0, 2, 4)
    return patches.reshape(-1, c, patch, patch), (hh // patch, ww // patch)


# ---------------------------------------------------------------------------------------------
# Weights


def random_state(config, vocab, generator):
    """A state dict in the checkpoint's names, float32 values rounded to BF16 (the router bias
    stays F32)."""
    v, t = config["vision_config"], config["text_config"]
    d, p = v["hidden_size"], v["patch_size"]
    sd = {}

    def rand(*shape, std=0.1):
        return torch.randn(*shape, generator=generator) * std

    sd["vision_tower.patch_embed.proj.weight"] = rand(d, 3, p, p, std=0.05)
    sd["vision_tower.patch_embed.proj.bias"] = rand(d)
    sd["vision_tower.patch_embed.pos_emb.weight"] = rand(v["init_pos_emb_height"], v["init_pos_emb_width"], d, std=0.5)
    for i in range(v["num_hidden_layers"]):
        b = f"vision_tower.encoder.blocks.{i}."
        for n in ["norm0", "norm1"]:
            sd[b + n + ".weight"] = 1 + rand(d)
            sd[b + n + ".bias"] = rand(d)
        sd[b + "wqkv.weight"] = rand(3 * d, d, std=0.2)
        sd[b + "wqkv.bias"] = rand(3 * d)
        sd[b + "wo.weight"] = rand(d, d, std=0.2)
        sd[b + "wo.bias"] = rand(d)
        sd[b + "mlp.fc0.weight"] = rand(v["intermediate_size"], d, std=0.2)
        sd[b + "mlp.fc0.bias"] = rand(v["intermediate_size"])
        sd[b + "mlp.fc1.weight"] = rand(d, v["intermediate_size"], std=0.2)
        sd[b + "mlp.fc1.bias"] = rand(d)
    sd["vision_tower.encoder.final_layernorm.weight"] = 1 + rand(d)
    sd["vision_tower.encoder.final_layernorm.bias"] = rand(d)
    m = d * v["merge_kernel_size"][0] * v["merge_kernel_size"][1]
    h = t["hidden_size"]
    sd["multi_modal_projector.pre_norm.weight"] = 1 + rand(d)
    sd["multi_modal_projector.pre_norm.bias"] = rand(d)
    sd["multi_modal_projector.linear_1.weight"] = rand(m, m, std=0.1)
    sd["multi_modal_projector.linear_1.bias"] = rand(m)
    sd["multi_modal_projector.linear_2.weight"] = rand(h, m, std=0.1)
    sd["multi_modal_projector.linear_2.bias"] = rand(h)
    lm = "language_model.model."
    sd[lm + "embed_tokens.weight"] = rand(vocab, h, std=1.0)
    sd[lm + "norm.weight"] = 1 + rand(h)
    sd["language_model.lm_head.weight"] = rand(vocab, h, std=0.2)
    heads, nope, rope, vd, lat = (t["num_attention_heads"], t["qk_nope_head_dim"], t["qk_rope_head_dim"],
                                  t["v_head_dim"], t["kv_lora_rank"])
    for i in range(t["num_hidden_layers"]):
        L = f"{lm}layers.{i}."
        sd[L + "input_layernorm.weight"] = 1 + rand(h)
        sd[L + "post_attention_layernorm.weight"] = 1 + rand(h)
        a = L + "self_attn."
        if t["q_lora_rank"] is None:
            sd[a + "q_proj.weight"] = rand(heads * (nope + rope), h, std=0.15)
        else:
            r = t["q_lora_rank"]
            sd[a + "q_a_proj.weight"] = rand(r, h, std=0.15)
            sd[a + "q_a_layernorm.weight"] = 1 + rand(r)
            sd[a + "q_b_proj.weight"] = rand(heads * (nope + rope), r, std=0.2)
        sd[a + "kv_a_proj_with_mqa.weight"] = rand(lat + rope, h, std=0.15)
        sd[a + "kv_a_layernorm.weight"] = 1 + rand(lat)
        sd[a + "kv_b_proj.weight"] = rand(heads * (nope + vd), lat, std=0.2)
        sd[a + "o_proj.weight"] = rand(h, heads * vd, std=0.15)
        # The original checkpoint stores each layer's rotary frequencies (ignored by loaders).
        sd[a + "rotary_emb.inv_freq"] = 1.0 / (t["rope_theta"] ** (torch.arange(0, rope, 2).float() / rope))
        mlp = L + "mlp."
        if i < t["first_k_dense_replace"]:
            for n, shape in [("gate_proj", (t["intermediate_size"], h)), ("up_proj", (t["intermediate_size"], h)),
                             ("down_proj", (h, t["intermediate_size"]))]:
                sd[mlp + n + ".weight"] = rand(*shape, std=0.15)
        else:
            e, mi = t["n_routed_experts"], t["moe_intermediate_size"]
            sd[mlp + "gate.weight"] = rand(e, h, std=0.3)
            # A bias of the size of the score differences: it changes the chosen experts.
            sd[mlp + "gate.e_score_correction_bias"] = (torch.rand(e, generator=generator) - 0.5) * 0.3
            for x in range(e):
                for n, shape in [("gate_proj", (mi, h)), ("up_proj", (mi, h)), ("down_proj", (h, mi))]:
                    sd[f"{mlp}experts.{x}.{n}.weight"] = rand(*shape, std=0.2)
            si = mi * t["n_shared_experts"]
            for n, shape in [("gate_proj", (si, h)), ("up_proj", (si, h)), ("down_proj", (h, si))]:
                sd[f"{mlp}shared_experts.{n}.weight"] = rand(*shape, std=0.2)
    keep_f32 = ("e_score_correction_bias", "inv_freq")
    return {k: (x.float() if k.endswith(keep_f32) else x.to(torch.bfloat16).float()) for k, x in sd.items()}


def save_checkpoint(folder, config, sd, ranks, names, preprocessor):
    folder.mkdir(parents=True, exist_ok=True)
    stored = {k: (x if k.endswith(("e_score_correction_bias", "inv_freq")) else x.to(torch.bfloat16)).contiguous()
              for k, x in sd.items()}
    names_sorted = sorted(stored)
    first = [n for n in names_sorted if not n.startswith("language_model.model.layers.2.")]
    shards = {"model-00001-of-00002.safetensors": first,
              "model-00002-of-00002.safetensors": [n for n in names_sorted if n not in first]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: stored[k] for k in keys}, folder / file, metadata={"format": "pt"})
        weight_map.update({k: file for k in keys})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with open(folder / "tiktoken.model", "w") as f:
        for token, rank in ranks.items():
            f.write(f"{base64.b64encode(token).decode()} {rank}\n")
    base = len(ranks)
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "TikTokenTokenizer",
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": None,
        "added_tokens_decoder": {str(i): {"content": n, "special": True} for i, n in names.items()
                                 if not n.startswith("<|reserved_token_")},
        "additional_special_tokens": ["<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
                                      "<|im_middle|>", "<|media_start|>", "<|media_content|>",
                                      "<|media_end|>", "<|media_pad|>"],
    }, indent=2))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": base, "eos_token_id": base + 1, "do_sample": False, "max_new_tokens": 512}, indent=2))


# ---------------------------------------------------------------------------------------------
# References


def deinterleave(rows, heads):
    """Per head, rows of interleaved (re, im) pairs to halves (all re, then all im)."""
    hd = rows.shape[0] // heads
    order = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    return torch.cat([rows[h * hd:(h + 1) * hd][order] for h in range(heads)])


def transformers_vision(config, sd):
    v = config["vision_config"]
    vc = Kimi_K25VisionConfig(
        patch_size=v["patch_size"], pos_emb_height=v["init_pos_emb_height"], pos_emb_width=v["init_pos_emb_width"],
        num_attention_heads=v["num_attention_heads"], num_hidden_layers=v["num_hidden_layers"],
        hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], hidden_act="gelu_pytorch_tanh",
        merge_kernel_size=v["merge_kernel_size"], rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    vc._attn_implementation = "eager"
    tower = Kimi_K25VisionModel(vc).float().eval()
    d, heads = v["hidden_size"], v["num_attention_heads"]
    s = {"patch_embed.proj.weight": sd["vision_tower.patch_embed.proj.weight"],
         "patch_embed.proj.bias": sd["vision_tower.patch_embed.proj.bias"],
         "patch_embed.pos_emb.position_embeddings": sd["vision_tower.patch_embed.pos_emb.weight"],
         "final_layernorm.weight": sd["vision_tower.encoder.final_layernorm.weight"],
         "final_layernorm.bias": sd["vision_tower.encoder.final_layernorm.bias"]}
    for i in range(v["num_hidden_layers"]):
        b, o = f"vision_tower.encoder.blocks.{i}.", f"layers.{i}."
        w, bias = sd[b + "wqkv.weight"], sd[b + "wqkv.bias"]
        s[o + "attn.q_proj.weight"], s[o + "attn.q_proj.bias"] = deinterleave(w[:d], heads), deinterleave(bias[:d], heads)
        s[o + "attn.k_proj.weight"], s[o + "attn.k_proj.bias"] = deinterleave(w[d:2 * d], heads), deinterleave(bias[d:2 * d], heads)
        s[o + "attn.v_proj.weight"], s[o + "attn.v_proj.bias"] = w[2 * d:], bias[2 * d:]
        for src, dst in [("norm0", "norm1"), ("norm1", "norm2"), ("wo", "attn.proj"), ("mlp.fc0", "mlp.fc1"),
                         ("mlp.fc1", "mlp.fc2")]:
            s[o + dst + ".weight"] = sd[b + src + ".weight"]
            s[o + dst + ".bias"] = sd[b + src + ".bias"]
    missing, unexpected = tower.load_state_dict(s, strict=False)
    assert not unexpected and all("time_position" in m for m in missing), (missing, unexpected)
    cfg = Kimi_K25Config(vision_config=vc.to_dict(), text_config={"model_type": "deepseek_v3",
                         "hidden_size": config["text_config"]["hidden_size"]},
                         projection_hidden_size=d, projection_layer_norm_eps=1e-5)
    projector = Kimi_K25MultimodalProjection(cfg).float().eval()
    projector.load_state_dict({
        "pre_norm.weight": sd["multi_modal_projector.pre_norm.weight"],
        "pre_norm.bias": sd["multi_modal_projector.pre_norm.bias"],
        "in_proj.weight": sd["multi_modal_projector.linear_1.weight"],
        "in_proj.bias": sd["multi_modal_projector.linear_1.bias"],
        "out_proj.weight": sd["multi_modal_projector.linear_2.weight"],
        "out_proj.bias": sd["multi_modal_projector.linear_2.bias"]})

    def features(pixels, grid):
        grid_thw = torch.tensor([[1, grid[0], grid[1]]])
        with torch.no_grad():
            pooled = tower(pixels, grid_thw).pooler_output
            return projector(pooled).squeeze(1)
    return features


def nemo_model(config, sd):
    cfg = KimiVLConfig(vision_config=dict(config["vision_config"]), text_config=dict(config["text_config"]),
                       media_placeholder_token_id=config["media_placeholder_token_id"])
    cfg.vision_config._attn_implementation = "sdpa"
    backend = BackendConfig(attn="sdpa", linear="torch", rms_norm="torch", rope_fusion=False, experts="torch",
                            dispatcher="torch", enable_hf_state_dict_adapter=True)
    model = KimiVLForConditionalGeneration(cfg, backend=backend).float().eval()
    hf = {k: v for k, v in sd.items() if not k.endswith("inv_freq")}
    native = model.state_dict_adapter.from_hf(hf)
    # The adapter names the head at the top level; the model keeps it in the language model.
    native["model.language_model.lm_head.weight"] = native.pop("lm_head.weight")
    missing, unexpected = model.load_state_dict(native, strict=False)
    assert not unexpected and not [m for m in missing if "freqs" not in m], (missing, unexpected)
    return model


def nemo_vision(model):
    def features(pixels, grid):
        with torch.no_grad():
            merged = model.model.vision_tower(pixels, torch.tensor([list(grid)]))
            return model.model.multi_modal_projector(merged)
    return features


def transformers_lm(config, sd, tmp):
    """transformers' DeepseekV3ForCausalLM, loaded from the checkpoint's per-expert names."""
    folder = Path(tmp) / "lm"
    folder.mkdir()
    lm = {}
    for k, x in sd.items():
        if k.startswith("language_model.model.") and not k.endswith("inv_freq"):
            lm["model." + k[len("language_model.model."):]] = x.contiguous()
        elif k == "language_model.lm_head.weight":
            lm["lm_head.weight"] = x.contiguous()
    save_file(lm, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(dict(config["text_config"], architectures=["DeepseekV3ForCausalLM"])))
    model, info = DeepseekV3ForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                         output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def routing_changes(sd, config, embeds):
    """How many (layer, token) choices the router bias changes on these inputs."""
    t = config["text_config"]
    changed = 0
    for i in range(t["first_k_dense_replace"], t["num_hidden_layers"]):
        g = f"language_model.model.layers.{i}.mlp.gate."
        scores = (embeds @ sd[g + "weight"].T).sigmoid()
        plain = scores.topk(t["num_experts_per_tok"]).indices.sort().values
        biased = (scores + sd[g + "e_score_correction_bias"]).topk(t["num_experts_per_tok"]).indices.sort().values
        changed += int((plain != biased).any(-1).sum())
    return changed


def real_tensors():
    """The real checkpoint's tensor names and shapes, from NeMo's adapter on the meta device."""
    text = dict(model_type="deepseek_v3", vocab_size=163840, hidden_size=2048, intermediate_size=11264,
                moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16,
                n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=2.446,
                n_group=1, topk_group=1, norm_topk_prob=True, scoring_func="sigmoid", topk_method="noaux_tc",
                first_k_dense_replace=1, moe_layer_freq=1, kv_lora_rank=512, q_lora_rank=None,
                qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, rms_norm_eps=1e-5,
                rope_theta=800000.0, rope_scaling=None, max_position_embeddings=131072, hidden_act="silu",
                tie_word_embeddings=False)
    vision = dict(patch_size=14, init_pos_emb_height=64, init_pos_emb_width=64, num_attention_heads=16,
                  num_hidden_layers=27, hidden_size=1152, intermediate_size=4304, merge_kernel_size=[2, 2])
    cfg = KimiVLConfig(vision_config=vision, text_config=text, media_placeholder_token_id=163605)
    backend = BackendConfig(attn="sdpa", linear="torch", rms_norm="torch", experts="torch", dispatcher="torch",
                            enable_hf_state_dict_adapter=True)
    with torch.device("meta"):
        model = KimiVLForConditionalGeneration(cfg, backend=backend)
        hf = model.state_dict_adapter.to_hf(model.state_dict())
    tensors = {k: list(v.shape) for k, v in hf.items()}
    for i in range(27):
        tensors[f"language_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = [32]
    return {"config": {"vision_config": vision, "text_config": text, "model_type": "kimi_vl",
                       "media_placeholder_token_id": 163605},
            "tensors": dict(sorted(tensors.items()))}


# ---------------------------------------------------------------------------------------------


def build(name, grouped, cases, seed):
    generator = torch.Generator().manual_seed(seed)
    ranks = train_ranks()
    encoding, names = tokenizer(ranks)
    base = len(ranks)
    vocab = base + RESERVED
    config = {"architectures": ["KimiVLForConditionalGeneration"], "model_type": "kimi_vl",
              "media_placeholder_token_id": base + 21, "pad_token_id": 0,
              "vision_config": dict(VISION, model_type="moonvit"),
              "text_config": text_config(vocab, grouped)}
    sd = random_state(config, vocab, generator)
    preprocessor = {"patch_size": 14, "pad_input": True, "image_mean": [0.5, 0.5, 0.5],
                    "image_std": [0.5, 0.5, 0.5], "in_token_limit": 64, "merge_kernel_size": [2, 2]}
    folder = OUT / name
    if folder.exists():
        shutil.rmtree(folder)
    save_checkpoint(folder, config, sd, ranks, names, preprocessor)

    vision_a = transformers_vision(config, sd)
    nemo = nemo_model(config, sd)
    vision_b = nemo_vision(nemo)
    with tempfile.TemporaryDirectory() as tmp:
        lm = transformers_lm(config, sd, tmp)
        tensors, meta = {}, {"cases": []}
        for case in cases:
            image = case["image"]()
            image.save(folder / f"{case['name']}.png")
            limit = preprocessor["in_token_limit"]
            pixels, grid = preprocess(image, 14, [2, 2], limit, True, [0.5] * 3, [0.5] * 3)
            feats_a, feats_b = vision_a(pixels, grid), vision_b(pixels, grid)
            vision_gap = float((feats_a - feats_b).abs().max())
            assert vision_gap < 1e-5, vision_gap
            text = render(case["prompt"])
            count = grid[0] * grid[1] // 4
            text = text.replace("<|media_pad|>", "<|media_pad|>" * count, 1)
            ids = encode(encoding, text)
            input_ids = torch.tensor([ids])
            media = input_ids == config["media_placeholder_token_id"]
            with torch.no_grad():
                embeds = lm.get_input_embeddings()(input_ids)
                embeds[media] = feats_a.to(embeds.dtype)
                logits = lm(inputs_embeds=embeds).logits[0]
                logits_b = nemo(input_ids=input_ids, pixel_values=pixels, image_grid_hws=torch.tensor([list(grid)]))
                logits_gap = float((logits - logits_b[0]).abs().max())
                assert logits_gap < 1e-4, logits_gap
                generated = lm.generate(inputs_embeds=embeds, attention_mask=torch.ones_like(input_ids),
                                        max_new_tokens=case["tokens"], do_sample=False,
                                        eos_token_id=[base + 1, base + 2], pad_token_id=base + 1)[0].tolist()
            changes = routing_changes(sd, config, embeds[0])
            assert changes > 0, "the router bias changes no choice"
            key = case["name"]
            tensors[f"{key}.pixel_values"] = pixels.reshape(pixels.shape[0], -1).contiguous()
            tensors[f"{key}.image_features"] = feats_a.contiguous()
            tensors[f"{key}.logits"] = logits.contiguous()
            meta["cases"].append({
                "name": key, "image": f"{key}.png", "prompt": case["prompt"], "in_token_limit": limit,
                "grid_hw": list(grid), "input_ids": ids, "greedy_ids": generated,
                "greedy_text": encoding.decode([t for t in generated if t < base]),
                "vision_gap_transformers_vs_nemo": vision_gap, "logits_gap_transformers_vs_nemo": logits_gap,
                "routing_changes_by_bias": changes,
            })
    save_file(tensors, OUT / f"{name}.expected.safetensors")
    (OUT / f"{name}.expected.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(name, [(c["name"], c["vision_gap_transformers_vs_nemo"], c["logits_gap_transformers_vs_nemo"])
                 for c in meta["cases"]])


def gradient_image(w, h, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // max(w - 1, 1)), (y * 255 // max(h - 1, 1)), ((x + y) * 3) % 256], -1)
    img = (img + rng.integers(0, 40, img.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(img, "RGB")


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    cases = [
        # 10x7 whole patches over the limit of 64: scaled to 143x95, padded to 168x112 (12x8
        # patches, the 6x6 position table resized).
        {"name": "scaled", "image": lambda: gradient_image(150, 100, 1), "tokens": 12,
         "prompt": "Output the polygon coordinates of the red shape in the image."},
        # 84x84 within the limit: a 6x6 grid, the position table used as is.
        {"name": "table", "image": lambda: gradient_image(84, 84, 2), "tokens": 12,
         "prompt": "What is the polygon of the dog on the left?"},
    ]
    build("kimi-tiny", False, cases, 0)
    build("kimi-tiny-grouped", True, cases[:1], 1)
    (OUT / "real-tensors.json").write_text(json.dumps(real_tensors(), indent=1) + "\n")


if __name__ == "__main__":
    main()
