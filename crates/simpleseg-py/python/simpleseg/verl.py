"""verl's custom reward function for SimpleSeg.

In a verl PPO/GRPO config:

    custom_reward_function:
      path: <site-packages>/simpleseg/verl.py     # or: python -c "import simpleseg.verl as m; print(m.__file__)"
      name: compute_score                         # compute_score_batch with reward_model.reward_manager=batch
      reward_kwargs: {centroid_weight: 0.0}       # optional: reward options for every row

verl loads that file on its own (`spec_from_file_location`), outside the package, so this
module imports the extension absolutely. Each row's `reward_model.ground_truth` is the object's
COCO RLE dict (or its JSON string; `simpleseg data rl --format verl` writes the string);
`extra_info` may carry reward options (`centroid_weight`, `format_weight`, `max_points`,
`point_penalty`, `mode`, `coords`) under the key `simpleseg`, which override `reward_kwargs`.
Other keyword arguments verl passes (`reward_router_address`, `reward_model_tokenizer`, ...)
are accepted and not used.
"""

import json

from simpleseg._simpleseg import iou_reward, iou_rewards

_OPTIONS = ("mode", "coords", "centroid_weight", "format_weight", "max_points", "point_penalty")


def _options(kwargs, extra_info):
    """Reward options: the config's `reward_kwargs`, then the row's `extra_info["simpleseg"]`."""
    options = {k: v for k, v in kwargs.items() if k in _OPTIONS}
    if isinstance(extra_info, dict) and isinstance(extra_info.get("simpleseg"), dict):
        options.update({k: v for k, v in extra_info["simpleseg"].items() if k in _OPTIONS})
    return options


def _truth(ground_truth):
    return json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs):
    """The IoU reward of one response (verl's `compute_score(data_source, solution_str,
    ground_truth, extra_info, **reward_kwargs)`); `data_source` is not used."""
    return float(iou_reward(solution_str, _truth(ground_truth), **_options(kwargs, extra_info)))


def compute_score_batch(data_sources, solution_strs, ground_truths, extra_infos=None, **kwargs):
    """The IoU rewards of a batch, for verl's `BatchRewardManager` (`compute_score(
    data_sources=, solution_strs=, ground_truths=, extra_infos=, **reward_kwargs)`): computed
    on every core without the GIL when the rows share their options."""
    n = len(solution_strs)
    if len(ground_truths) != n:
        raise ValueError(f"{n} responses but {len(ground_truths)} ground truths")
    extras = list(extra_infos) if extra_infos is not None else [None] * n
    options = [_options(kwargs, extra) for extra in extras]
    truths = [_truth(t) for t in ground_truths]
    if all(o == options[0] for o in options):
        return [float(r) for r in iou_rewards(list(solution_strs), truths, **(options[0] if n else {}))]
    return [float(iou_reward(s, t, **o)) for s, t, o in zip(solution_strs, truths, options)]
