"""The rest of the API: parsing, metrics, rewards, the trainer hooks, and hostile input."""

import json
import math

import numpy as np
import pytest
import simpleseg
import simpleseg.trl
import simpleseg.verl

TRIANGLE = "[[[0.1,0.1],[0.9,0.1],[0.5,0.9]]]"
SQUARE = "[[[0.0, 0.0], [0.5, 0.0], [0.5, 0.5], [0.0, 0.5]]]"


def square_rle():
    mask = np.zeros((4, 4), np.uint8)
    mask[:2, :2] = 1
    return simpleseg.rle_encode(mask)


def test_readme_example():
    rle = simpleseg.answer_to_rle(TRIANGLE, 64, 48)
    assert rle["size"] == [48, 64] and isinstance(rle["counts"], str)
    assert simpleseg.iou_reward(TRIANGLE, rle) == 1.0


def test_parse_answer_fields():
    out = simpleseg.parse_answer("Sure: [[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]] and [0.1, 0.2, 0.3, 0.4]")
    assert out["polygons"] == [[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]]
    assert out["boxes"] == [[0.1, 0.2, 0.3, 0.4]]
    assert set(out) == {"mode", "polygons", "boxes", "points", "boxed", "blocks", "warnings"}
    assert simpleseg.parse_answer("nothing")["warnings"]


def test_metrics_and_rewards():
    gt = square_rle()
    m = simpleseg.Metrics()
    m.add_answer(SQUARE, gt, [0, 0, 2, 2])
    m.add_answer("no polygon", gt, [0, 0, 2, 2])
    m.add(gt, gt, [0, 0, 2, 2])
    assert len(m) == 3
    d = m.to_dict()
    assert d["n"] == 3 and d["parse_failures"] == 1
    assert math.isclose(m.giou, 2 / 3) and math.isclose(m.acc50, 2 / 3)
    assert simpleseg.iou_reward(SQUARE, gt) == 1.0
    assert simpleseg.iou_reward("nothing", gt) == 0.0
    shaped = simpleseg.iou_reward(SQUARE, gt, format_weight=0.1, max_points=3, point_penalty=0.05)
    assert math.isclose(shaped, 1.05)
    answers = [SQUARE, "nothing", "[[[0.0, 0.0], [0.25, 0.0], [0.25, 0.25], [0.0, 0.25]]]"] * 50
    batch = simpleseg.iou_rewards(answers, [gt] * len(answers))
    assert batch == [simpleseg.iou_reward(a, gt) for a in answers]
    assert simpleseg.iou_rewards(answers, [gt] * len(answers), threads=1) == batch
    hist = simpleseg.reward_histogram(batch, bins=4)
    assert sum(hist["counts"]) == len(batch) and len(hist["edges"]) == 5


def test_verl_and_trl_signatures():
    gt = square_rle()
    assert simpleseg.verl.compute_score("synth", SQUARE, gt) == 1.0
    assert simpleseg.verl.compute_score("synth", SQUARE, json.dumps(gt), {"simpleseg": {"format_weight": 0.5}}) == 1.5
    prompts = ["p1", "p2", "p3"]
    completions = [SQUARE, [{"role": "assistant", "content": SQUARE}], [{"role": "assistant", "content": [{"type": "text", "text": "none"}]}]]
    rewards = simpleseg.trl.iou_reward(prompts, completions, rle=[gt, json.dumps(gt), gt], other=[1, 2, 3])
    assert rewards == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError, match="rle"):
        simpleseg.trl.iou_reward(prompts, completions, masks=[gt] * 3)
    custom = simpleseg.trl.make_iou_reward(column="mask", centroid_weight=1.0)
    assert custom(prompts[:1], [SQUARE], mask=[gt]) == [1.0]


def test_verl_loads_the_file_outside_the_package():
    """verl loads `custom_reward_function.path` with spec_from_file_location under its own module
    name (verl.trainer.ppo.reward.get_custom_reward_fn), passes reward_kwargs and, in the reward
    loop, its own keyword arguments; BatchRewardManager calls a batch function by keyword."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("custom_module", simpleseg.verl.__file__)
    module = importlib.util.module_from_spec(spec)
    sys.modules["custom_module"] = module
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["custom_module"]
    gt = square_rle()
    extra = {"simpleseg": {"format_weight": 0.5}}
    assert module.compute_score("synth", SQUARE, gt, None, reward_router_address=None,
                                reward_model_tokenizer=None) == 1.0
    # reward_kwargs apply to every row; a row's own options win.
    assert module.compute_score("synth", SQUARE, gt, None, format_weight=0.25) == 1.25
    assert module.compute_score("synth", SQUARE, gt, extra, format_weight=0.25) == 1.5
    answers = [SQUARE, "nothing", SQUARE]
    batch = module.compute_score_batch(data_sources=["synth"] * 3, solution_strs=answers,
                                       ground_truths=[gt, json.dumps(gt), gt], extra_infos=[{}, {}, {}],
                                       format_weight=0.25)
    assert batch == [module.compute_score("synth", a, gt, None, format_weight=0.25) for a in answers]
    mixed = module.compute_score_batch(data_sources=["synth"] * 3, solution_strs=answers,
                                       ground_truths=[gt] * 3, extra_infos=[extra, None, {}])
    assert mixed == [1.5, 0.0, 1.0]


def test_trl_rows_without_a_mask_get_none():
    gt = square_rle()
    rewards = simpleseg.trl.iou_reward(["a", "b", "c"], [SQUARE, SQUARE, "nothing"], rle=[gt, None, gt])
    assert rewards == [1.0, None, 0.0]


@pytest.mark.parametrize("call", [
    lambda: simpleseg.answer_to_rle(TRIANGLE, 0, 10),
    lambda: simpleseg.answer_to_rle(TRIANGLE, 10, 10, mode="fancy"),
    lambda: simpleseg.answer_to_rle(TRIANGLE, 10, 10, coords="inches"),
    lambda: simpleseg.rle_decode({"size": [2, 2], "counts": [1, 9]}),
    lambda: simpleseg.rle_decode({"size": [2]}),
    lambda: simpleseg.rle_decode("not json"),
    lambda: simpleseg.rle_decode(42),
    lambda: simpleseg.rle_decode({"size": [2, 2], "counts": 3.5}),
    lambda: simpleseg.rle_decode({"size": [-1, 2], "counts": "0"}),
    lambda: simpleseg.rle_decode({"size": [2, 2], "counts": b"\xff\xfe"}),
    lambda: simpleseg.mask_to_target(np.zeros((4, 4), np.float32)),
    lambda: simpleseg.mask_to_target(np.zeros(16, np.uint8)),
    lambda: simpleseg.mask_to_target(np.zeros((4, 4), np.uint8), epsilon_ratio=-1.0),
    lambda: simpleseg.rle_iou(square_rle(), simpleseg.rle_encode(np.zeros((3, 3), np.uint8))),
    lambda: simpleseg.rle_merge([]),
    lambda: simpleseg.iou_rewards([SQUARE], []),
    lambda: simpleseg.iou_reward(SQUARE, square_rle(), centroid_weight=float("nan")),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()


def test_malformed_answers_are_empty_masks_not_errors():
    for text in ["[[[nan, 0.1], [0.2, 0.3], [0.4, 0.5]]]", "[[[1e308, 1e308], [0, 0], [1, 1]]]", "[" * 10000,
                 "[[[0.1, 0.1], [0.2" + ", [0.3, 0.3]" * 20000, "\x00\uffff"]:
        rle = simpleseg.answer_to_rle(text, 32, 32, mode="robust")
        assert rle["size"] == [32, 32]


def test_pycocotools_dicts_with_byte_counts_are_accepted():
    rle = square_rle()
    as_bytes = {"size": rle["size"], "counts": rle["counts"].encode()}
    assert simpleseg.rle_decode(as_bytes).tolist() == simpleseg.rle_decode(rle).tolist()
    assert simpleseg.iou_reward(SQUARE, as_bytes) == 1.0
    assert simpleseg.rle_iou(as_bytes, json.dumps(rle)) == 1.0


def test_huge_polygons_rasterize_without_blowing_up():
    points = ", ".join(f"[{0.5 + 0.4 * math.cos(t * 2 * math.pi / 200_000):.5f}, "
                       f"{0.5 + 0.4 * math.sin(t * 2 * math.pi / 200_000):.5f}]"
                       for t in range(200_000))
    rle = simpleseg.answer_to_rle(f"[[{points}]]", 4000, 3000)
    assert 0.45 < simpleseg.rle_area(rle) / (4000 * 3000) < 0.55
