"""Type stubs of simpleseg's native module."""

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import numpy.typing as npt

Rle = Union[Dict[str, Any], str]

def parse_answer(text: str, mode: str = "official") -> Dict[str, Any]:
    """Polygons, boxes, points, boxed contents, code blocks and warnings of an answer."""

def answer_to_rle(text: str, width: int, height: int, mode: str = "official", coords: str = "normalized") -> Dict[str, Any]:
    """The union mask of an answer's polygons as a COCO RLE dict {"size": [h, w], "counts": str}."""

def answer_to_mask(text: str, width: int, height: int, mode: str = "official", coords: str = "normalized") -> npt.NDArray[np.uint8]:
    """The union mask of an answer's polygons, (height, width) uint8 of 0/1."""

def mask_to_target(mask: npt.NDArray[Any], epsilon_ratio: float = 0.001) -> str:
    """The data script's target string for a (height, width) uint8 or bool mask."""

def rle_encode(mask: npt.NDArray[Any]) -> Dict[str, Any]:
    """A (height, width) uint8 or bool mask as a COCO RLE dict."""

def rle_decode(rle: Rle) -> npt.NDArray[np.uint8]:
    """A COCO RLE dict (compressed or list counts, or its JSON) as a (height, width) uint8 mask."""

def rle_area(rle: Rle) -> int: ...
def rle_bbox(rle: Rle) -> List[float]:
    """[x, y, width, height] of the foreground."""

def rle_iou(a: Rle, b: Rle) -> float:
    """IoU of two masks of one size, as pycocotools' iou (0 when both are empty)."""

def rle_merge(rles: Sequence[Rle]) -> Dict[str, Any]:
    """Union of masks of one size."""

def iou_reward(answer: str, gt_rle: Rle, mode: str = "robust", coords: str = "normalized",
               centroid_weight: float = 0.0, format_weight: float = 0.0,
               max_points: Optional[int] = None, point_penalty: float = 0.0) -> float:
    """The IoU reward of `simpleseg train rl` for one answer."""

def iou_rewards(answers: Sequence[str], gt_rles: Sequence[Rle], mode: str = "robust",
                coords: str = "normalized", centroid_weight: float = 0.0, format_weight: float = 0.0,
                max_points: Optional[int] = None, point_penalty: float = 0.0,
                threads: Optional[int] = None) -> List[float]:
    """iou_reward for many answers, on every core (or `threads`), without the GIL."""

def reward_histogram(values: Sequence[float], bins: int = 10, low: float = 0.0, high: float = 1.0) -> Dict[str, List[float]]:
    """{"edges": [...], "counts": [...]} of values in equal bins."""

class Metrics:
    """cIoU, gIoU and Acc@0.5 accumulated as `simpleseg eval` computes them."""
    def __init__(self) -> None: ...
    def add(self, pred_rle: Rle, gt_rle: Rle, gt_bbox: Sequence[float]) -> None: ...
    def add_answer(self, answer: str, gt_rle: Rle, gt_bbox: Sequence[float], mode: str = "official",
                   coords: str = "normalized") -> None: ...
    def __len__(self) -> int: ...
    @property
    def ciou(self) -> float: ...
    @property
    def giou(self) -> float: ...
    @property
    def acc50(self) -> float: ...
    def to_dict(self) -> Dict[str, float]: ...


Image = Union[str, "os.PathLike[str]", bytes, npt.NDArray[np.uint8], Any]
"""A path, encoded bytes, a (height, width[, 3 | 4]) uint8 array or a PIL image."""

class Segmentation:
    """A segmentation, as `simpleseg segment --json` prints it (`to_dict()`)."""
    answer: str
    prompt: str
    polygons: List[List[List[float]]]
    polygons_pixels: List[List[List[float]]]
    mask: npt.NDArray[np.uint8]
    rle: Dict[str, Any]
    bbox: List[float]
    area: int
    svg: str
    warnings: List[Dict[str, Any]]
    timings: Dict[str, float]
    stop_reason: str
    token_ids: List[int]
    def to_dict(self) -> Dict[str, Any]: ...

class ChatAnswer:
    """A chat answer; str() is its text."""
    text: str
    token_ids: List[int]
    prompt_tokens: int
    stop_reason: str
    seed: Optional[int]
    timings: Dict[str, float]
    def to_dict(self) -> Dict[str, Any]: ...

class Model:
    """A model folder (or the built-in model when path is None), loaded in this process."""
    name: str
    architecture: str
    dtype: str
    def __init__(self, path: Optional[Union[str, "os.PathLike[str]"]] = None, *, quantize: Optional[str] = None,
                 dtype: str = "auto", device: str = "cpu", threads: Optional[int] = None) -> None: ...
    def segment(self, image: Image, query: Optional[str] = None, *, point: Optional[Sequence[float]] = None,
                box: Optional[Sequence[float]] = None, constrain: Optional[str] = None,
                prompt_template: Optional[str] = None, mode: str = "robust", coords: str = "normalized",
                **sampling: Any) -> Segmentation: ...
    def segment_batch(self, items: Sequence[Union[Dict[str, Any], Tuple[Image, str]]], *,
                      constrain: Optional[str] = None, prompt_template: Optional[str] = None,
                      mode: str = "robust", coords: str = "normalized", batch_size: int = 8,
                      **sampling: Any) -> List[Segmentation]: ...
    def chat(self, image: Image, prompt: str, n: int = 1, *, system: Optional[str] = None,
             constrain: Optional[str] = None, **sampling: Any) -> Union[ChatAnswer, List[ChatAnswer]]: ...
