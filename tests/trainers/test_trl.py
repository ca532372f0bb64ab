"""TRL and LLaMA-Factory reading `data sft --format trl|llamafactory` with the `datasets`
library, and TRL's GRPOTrainer training the built-in model for a few steps with
simpleseg.trl.iou_reward (rows without a mask left out of the reward)."""

import json

import pytest

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")

import simpleseg  # noqa: E402
import simpleseg.trl  # noqa: E402


def test_sft_formats_load_with_datasets(data):
    plain = json.loads((data / "sft-simpleseg.json").read_text())
    for fmt in ("trl", "llamafactory"):
        dataset = datasets.load_dataset("json", data_files=str(data / f"sft-{fmt}.json"), split="train")
        assert len(dataset) == len(plain)
        for row, original in zip(dataset, plain):
            user, answer = original["conversations"]
            image, question = user["value"][len("<img>"):].split("</img>")
            assert row["images"] == [image] and (data / "root" / image).is_file()
            messages = row["messages"]
            assert [m["role"] for m in messages] == ["user", "assistant"]
            if fmt == "trl":
                assert messages[0]["content"][0]["type"] == "image"
                assert messages[0]["content"][1]["text"] == question
                assert messages[1]["content"][0]["text"] == answer["value"]
            else:
                assert messages[0]["content"] == "<image>" + question
                assert messages[1]["content"] == answer["value"]


def test_grpo_trains_the_built_in_model_with_the_iou_reward(data, tmp_path):
    from PIL import Image

    records = [json.loads(l) for l in (data / "rl.jsonl").read_text().splitlines()][:4]
    rows = {
        "prompt": [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": r["prompt"]}]}]
                   for r in records],
        "image": [Image.open(data / "root" / r["image"]).convert("RGB") for r in records],
        # A row of another task has no mask: the reward leaves it out (None).
        "rle": [json.dumps(r["rle"]) for r in records[:3]] + [None],
    }
    dataset = datasets.Dataset.from_dict(rows)
    seen = []

    def reward(prompts, completions, **columns):
        scores = simpleseg.trl.iou_reward(prompts, completions, **columns)
        seen.append((completions, columns["rle"], scores))
        return scores

    reward.__name__ = "simpleseg_iou"
    config = trl.GRPOConfig(output_dir=str(tmp_path / "grpo"), max_steps=4, per_device_train_batch_size=2,
                            num_generations=2, max_completion_length=48, learning_rate=1e-5, logging_steps=1,
                            report_to="none", save_strategy="no", use_cpu=True, bf16=False, seed=0,
                            temperature=1.0)
    trainer = trl.GRPOTrainer(model=str(data / "model"), reward_funcs=[reward], args=config,
                              train_dataset=dataset)
    trainer.train()
    assert trainer.state.global_step == 4
    logged = [h for h in trainer.state.log_history if "rewards/simpleseg_iou/mean" in h]
    assert logged, trainer.state.log_history
    # An epoch of the four prompts: the row without a mask came too.
    assert any(t is None for _, truths, _ in seen for t in truths)
    # What TRL passed and got back: completions scored as simpleseg scores them, None where
    # the row has no mask.
    for completions, truths, scores in seen:
        for completion, truth, score in zip(completions, truths, scores):
            if truth is None:
                assert score is None
            else:
                text = completion if isinstance(completion, str) else completion[-1]["content"]
                if isinstance(text, list):
                    text = "".join(p.get("text", "") for p in text)
                assert score == simpleseg.iou_reward(text, json.loads(truth))
