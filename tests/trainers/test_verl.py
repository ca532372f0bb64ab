"""verl reading `data rl --format verl` with its own RLHFDataset (the image, the prompt and the
ground truth come through), and scoring with simpleseg.verl through its own loader
(`get_custom_reward_fn`) and reward managers (naive and batch)."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("verl")

import simpleseg  # noqa: E402
import simpleseg.verl  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402


def test_rlhf_dataset_reads_the_parquet(data):
    """As verl's rollout does: the dataset's raw prompt, its images through
    RLHFDataset.process_vision_info, then the processor."""
    import asyncio

    from PIL import Image
    from verl.utils.dataset.rl_dataset import RLHFDataset

    model = str(data / "model")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model)
    processor = transformers.AutoProcessor.from_pretrained(model)
    config = OmegaConf.create({"max_prompt_length": 1024, "filter_overlong_prompts": False,
                               "cache_dir": str(data / "verl-cache")})
    dataset = RLHFDataset(str(data / "rl.parquet"), tokenizer, config, processor)
    ours = [json.loads(l) for l in (data / "rl.jsonl").read_text().splitlines()]
    assert len(dataset) == len(ours)
    for i in (0, len(ours) - 1):
        row = dataset[i]
        record = ours[i]
        messages = row["raw_prompt"]
        images, _ = asyncio.run(RLHFDataset.process_vision_info(messages, 14, config))
        original = Image.open(data / "root" / record["image"]).convert("RGB")
        assert images[0].size == original.size == (record["width"], record["height"])
        assert np.array_equal(np.asarray(images[0].convert("RGB")), np.asarray(original))
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert record["prompt"] in text
        inputs = processor(text=[text], images=images, return_tensors="pt")
        image_token = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        grid = inputs["image_grid_thw"][0]
        assert int((inputs["input_ids"][0] == image_token).sum()) == int(grid.prod()) // 4
        assert json.loads(row["reward_model"]["ground_truth"]) == record["rle"]
        assert row["extra_info"]["ref_id"] == record["ref_id"]
        assert row["extra_info"]["sent_id"] == record["sent_id"]


def batch_of(tokenizer, answers, truths, extras):
    """A DataProto as verl's rollout leaves it: left-padded prompts, right-padded responses."""
    from verl import DataProto

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    prompts = [tokenizer("Where is it?").input_ids for _ in answers]
    responses = [tokenizer(a).input_ids for a in answers]
    p, r = max(map(len, prompts)), max(map(len, responses))
    prompt_ids = torch.tensor([[pad] * (p - len(x)) + x for x in prompts])
    response_ids = torch.tensor([x + [pad] * (r - len(x)) for x in responses])
    mask = torch.tensor([[0] * (p - len(x)) + [1] * len(x) + [1] * len(y) + [0] * (r - len(y))
                         for x, y in zip(prompts, responses)])
    return DataProto.from_dict(
        tensors={"prompts": prompt_ids, "responses": response_ids, "attention_mask": mask},
        non_tensors={"data_source": np.array(["simpleseg/synth"] * len(answers), dtype=object),
                     "reward_model": np.array([{"ground_truth": t, "style": "rule"} for t in truths], dtype=object),
                     "extra_info": np.array(extras, dtype=object)},
    ), [len(x) for x in responses]


@pytest.mark.parametrize("manager", ["naive", "batch"])
def test_reward_managers_score_with_simpleseg(data, manager):
    from verl.trainer.ppo.reward import get_custom_reward_fn
    from verl.workers.reward_manager.batch import BatchRewardManager
    from verl.workers.reward_manager.naive import NaiveRewardManager

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(data / "model"))
    records = [json.loads(l) for l in (data / "rl.jsonl").read_text().splitlines()][:4]
    truths = [json.dumps(r["rle"]) for r in records]
    # The SFT target of the first object answers it exactly; the others are guesses.
    target = simpleseg.mask_to_target(simpleseg.rle_decode(records[0]["rle"]))
    answers = [target, "[[[0.1, 0.1], [0.9, 0.1], [0.5, 0.9]]]", "no idea", f"It is at {target}."]
    extras = [{"simpleseg": {"format_weight": 0.5}}, {}, {}, {}]
    name = "compute_score" if manager == "naive" else "compute_score_batch"
    # The path the docstring gives: verl loads the file by path, outside the package.
    config = OmegaConf.create({"reward": {"custom_reward_function": {
        "path": simpleseg.verl.__file__, "name": name, "reward_kwargs": {"centroid_weight": 0.0}}}})
    score = get_custom_reward_fn(config)
    data_proto, lengths = batch_of(tokenizer, answers, truths, extras)
    cls = NaiveRewardManager if manager == "naive" else BatchRewardManager
    rewards = cls(tokenizer=tokenizer, num_examine=0, compute_score=score)(data_proto)
    got = [float(rewards[i, n - 1]) for i, n in enumerate(lengths)]
    decoded = [tokenizer.decode(tokenizer(a).input_ids, skip_special_tokens=True) for a in answers]
    want = [simpleseg.verl.compute_score("simpleseg/synth", d, t, e) for d, t, e in zip(decoded, truths, extras)]
    assert got == pytest.approx(want, abs=1e-6)
    # The data script's target draws close to its mask (IoU ~0.9), plus the format bonus.
    assert got[0] > 1.3 and got[2] == 0.0
