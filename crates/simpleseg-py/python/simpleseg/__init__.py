"""SimpleSeg for Python: models that segment (`simpleseg.Model`), and the exact protocol:
answer parsing, pycocotools-exact masks, the data script's targets, metrics and the IoU
reward, computed by simpleseg's Rust core.

    import simpleseg
    model = simpleseg.Model()                         # the built-in model; or Model("path/to/folder")
    result = model.segment("photo.jpg", "the dog")    # path, bytes, numpy array or PIL image
    result.mask                                       # (height, width) uint8 of 0/1
    result.rle, result.polygons, result.answer

    import simpleseg
    rle = simpleseg.answer_to_rle("[[[0.1, 0.1], [0.9, 0.1], [0.5, 0.9]]]", 64, 48)
    mask = simpleseg.rle_decode(rle)                  # (48, 64) uint8
    target = simpleseg.mask_to_target(mask)           # the data script's answer string
    r = simpleseg.iou_reward("[[[0.1, 0.1], [0.9, 0.1], [0.5, 0.9]]]", rle)   # 1.0

Trainer hooks: `simpleseg.verl.compute_score` (verl) and `simpleseg.trl.iou_reward` (TRL).
"""

from ._simpleseg import (
    ChatAnswer,
    Metrics,
    Model,
    Segmentation,
    answer_to_mask,
    answer_to_rle,
    iou_reward,
    iou_rewards,
    mask_to_target,
    parse_answer,
    reward_histogram,
    rle_area,
    rle_bbox,
    rle_decode,
    rle_encode,
    rle_iou,
    rle_merge,
)

__all__ = [
    "ChatAnswer",
    "Metrics",
    "Model",
    "Segmentation",
    "answer_to_mask",
    "answer_to_rle",
    "iou_reward",
    "iou_rewards",
    "mask_to_target",
    "parse_answer",
    "reward_histogram",
    "rle_area",
    "rle_bbox",
    "rle_decode",
    "rle_encode",
    "rle_iou",
    "rle_merge",
]
