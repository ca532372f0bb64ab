"""TRL's GRPOTrainer reward function for SimpleSeg.

    from trl import GRPOConfig, GRPOTrainer
    import simpleseg.trl

    trainer = GRPOTrainer(model=..., reward_funcs=[simpleseg.trl.iou_reward],
                          train_dataset=dataset,  # a column "rle": each row's COCO RLE dict
                          args=GRPOConfig(...))

Rewards for a whole batch are computed on every core without the GIL.
"""

import json

from ._simpleseg import iou_rewards


def _text(completion):
    """A completion's text: a string, or a conversational list of messages (the last
    assistant message's content, which may itself be a list of parts)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list):
        for message in reversed(completion):
            if isinstance(message, dict) and message.get("role", "assistant") == "assistant":
                content = message.get("content", "")
                if isinstance(content, list):
                    return "".join(p.get("text", "") for p in content if isinstance(p, dict))
                return str(content)
        return ""
    raise ValueError(f"a completion is a string or a list of messages, not {type(completion).__name__}")


def make_iou_reward(column="rle", **options):
    """A reward function reading the ground truth from dataset column `column`, with reward
    options as `simpleseg.iou_reward` takes them. A row whose ground truth is None gets None
    (TRL then leaves it out of this reward: rows of other tasks)."""

    def iou_reward(prompts, completions, **columns):
        if column not in columns:
            raise ValueError(f"the dataset has no {column!r} column with the ground-truth RLE")
        truths = [json.loads(t) if isinstance(t, str) else t for t in columns[column]]
        # Rows without a mask (other tasks of a multi-task dataset) get None, which TRL
        # leaves out of this reward.
        scored = [i for i, t in enumerate(truths) if t is not None]
        rewards = iou_rewards([_text(completions[i]) for i in scored], [truths[i] for i in scored], **options)
        out = [None] * len(truths)
        for i, r in zip(scored, rewards):
            out[i] = r
        return out

    iou_reward.__name__ = "simpleseg_iou"
    return iou_reward


iou_reward = make_iou_reward()
iou_reward.__doc__ = """TRL reward function: IoU of each completion's mask with the `rle` column."""
