"""verl's custom reward function for SimpleSeg.

In a verl PPO/GRPO config:

    custom_reward_function:
      path: <site-packages>/simpleseg/verl.py     # or: python -c "import simpleseg.verl as m; print(m.__file__)"
      name: compute_score

Each dataset row's `reward_model.ground_truth` is the object's COCO RLE dict (or its JSON
string); `extra_info` may carry reward options (`centroid_weight`, `format_weight`,
`max_points`, `point_penalty`, `mode`, `coords`) under the key `simpleseg`.
"""

import json

from ._simpleseg import iou_reward

_OPTIONS = ("mode", "coords", "centroid_weight", "format_weight", "max_points", "point_penalty")


def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """The IoU reward of one response (verl's `compute_score(data_source, solution_str,
    ground_truth, extra_info)` signature); `data_source` is not used."""
    if isinstance(ground_truth, str):
        ground_truth = json.loads(ground_truth)
    options = {}
    if isinstance(extra_info, dict) and isinstance(extra_info.get("simpleseg"), dict):
        options = {k: v for k, v in extra_info["simpleseg"].items() if k in _OPTIONS}
    return float(iou_reward(solution_str, ground_truth, **options))
