//! `simpleseg._simpleseg`: simpleseg for Python. Thin wrappers only: every computation is
//! `simpleseg-core`'s or the engine's ([`model`]), so answers, masks, targets, metrics and
//! rewards are the same numbers the command line gives. Errors raise `ValueError` (bad
//! input) and the like with the command line's messages.

mod model;

use numpy::ndarray::Array2;
use numpy::{IntoPyArray, PyArray2, PyReadonlyArray2, PyUntypedArrayMethods};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};
use rayon::prelude::*;
use simpleseg_core::metrics::{aggregate, box_iou, score_answer, xywh_to_xyxy, BoxSource, Score};
use simpleseg_core::reward::{reward, RewardOptions};
use simpleseg_core::{parse_answer as core_parse, CoordMode, ParseMode, RleMask};

fn value_error(e: impl std::fmt::Display) -> PyErr {
    PyValueError::new_err(e.to_string())
}

fn parse_mode(mode: &str) -> PyResult<ParseMode> {
    mode.parse().map_err(value_error)
}

fn coord_mode(coords: &str) -> PyResult<CoordMode> {
    coords.parse().map_err(value_error)
}

/// A JSON value as Python objects (through the `json` module, exact for numbers).
pub(crate) fn to_python(py: Python<'_>, value: &serde_json::Value) -> PyResult<Py<PyAny>> {
    let json = py.import("json")?;
    Ok(json.call_method1("loads", (value.to_string(),))?.unbind())
}

const RLE_SHAPE: &str =
    "an RLE is a dict {\"size\": [height, width], \"counts\": str | bytes | list of runs} or its JSON string";

/// An RLE dict `{"size": [h, w], "counts": str | bytes | list}` (as pycocotools writes it, or
/// decoded from JSON) or its JSON string, as a mask.
fn rle_from_py(obj: &Bound<'_, PyAny>) -> PyResult<RleMask> {
    if let Ok(text) = obj.cast::<PyString>() {
        let value: serde_json::Value = serde_json::from_str(&text.to_cow()?)
            .map_err(|e| value_error(format!("RLE JSON: {e}")))?;
        return RleMask::from_json_value(&value).map_err(value_error);
    }
    let dict = obj
        .cast::<PyDict>()
        .map_err(|_| PyValueError::new_err(RLE_SHAPE))?;
    let size = dict
        .get_item("size")?
        .and_then(|s| s.extract::<Vec<u32>>().ok())
        .filter(|s| s.len() == 2)
        .ok_or_else(|| {
            PyValueError::new_err("expected \"size\": [height, width] of two non-negative integers")
        })?;
    let (height, width) = (size[0], size[1]);
    let counts = dict
        .get_item("counts")?
        .ok_or_else(|| PyValueError::new_err(RLE_SHAPE))?;
    let mask = if let Ok(text) = counts.cast::<PyString>() {
        RleMask::from_compressed(height, width, &text.to_cow()?)
    } else if let Ok(bytes) = counts.cast::<PyBytes>() {
        let text = std::str::from_utf8(bytes.as_bytes())
            .map_err(|_| PyValueError::new_err("compressed RLE counts must be ASCII"))?;
        RleMask::from_compressed(height, width, text)
    } else if let Ok(runs) = counts.extract::<Vec<u32>>() {
        RleMask::from_counts(height, width, runs)
    } else {
        return Err(PyValueError::new_err(RLE_SHAPE));
    };
    mask.map_err(value_error)
}

/// A COCO RLE dict as pycocotools writes it: `{"size": [h, w], "counts": str}`.
pub(crate) fn rle_to_py(py: Python<'_>, mask: &RleMask) -> PyResult<Py<PyAny>> {
    let d = PyDict::new(py);
    d.set_item("size", PyList::new(py, [mask.height(), mask.width()])?)?;
    d.set_item("counts", mask.to_compressed())?;
    Ok(d.into_any().unbind())
}

/// A 2-D array (uint8 or bool, non-zero is foreground) as an RLE mask. A C-contiguous uint8
/// array is read in place; other layouts and bool arrays are gathered once.
fn mask_from_array(mask: &Bound<'_, PyAny>) -> PyResult<RleMask> {
    fn size(shape: &[usize]) -> PyResult<(u32, u32)> {
        Ok((
            u32::try_from(shape[0]).map_err(value_error)?,
            u32::try_from(shape[1]).map_err(value_error)?,
        ))
    }
    let result = if let Ok(a) = mask.extract::<PyReadonlyArray2<'_, u8>>() {
        let (h, w) = size(a.shape())?;
        // `as_slice` also accepts Fortran order, which is not row-major.
        match a.as_slice().ok().filter(|_| a.is_c_contiguous()) {
            Some(values) => RleMask::from_row_major(values, h, w),
            None => {
                RleMask::from_row_major(&a.as_array().iter().copied().collect::<Vec<_>>(), h, w)
            }
        }
    } else if let Ok(a) = mask.extract::<PyReadonlyArray2<'_, bool>>() {
        let (h, w) = size(a.shape())?;
        let values: Vec<u8> = a.as_array().iter().map(|&x| u8::from(x)).collect();
        RleMask::from_row_major(&values, h, w)
    } else {
        return Err(PyValueError::new_err(
            "a mask is a 2-D numpy array of uint8 or bool (height, width)",
        ));
    };
    result.map_err(value_error)
}

pub(crate) fn mask_to_array<'py>(
    py: Python<'py>,
    mask: &RleMask,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let (h, w) = (mask.height() as usize, mask.width() as usize);
    let values = mask.to_row_major().map_err(value_error)?;
    let array = Array2::from_shape_vec((h, w), values).map_err(value_error)?;
    Ok(array.into_pyarray(py))
}

/// Everything found in an answer: polygons, boxes, points, boxed contents, code blocks and
/// warnings (the fields of `simpleseg decode --json` that need no image size).
#[pyfunction]
#[pyo3(signature = (text, mode = "official"))]
fn parse_answer(py: Python<'_>, text: &str, mode: &str) -> PyResult<Py<PyAny>> {
    to_python(py, &core_parse(text, parse_mode(mode)?).to_json_value())
}

fn answer_mask(text: &str, width: u32, height: u32, mode: &str, coords: &str) -> PyResult<RleMask> {
    core_parse(text, parse_mode(mode)?)
        .mask(width, height, coord_mode(coords)?)
        .map_err(value_error)
}

/// The mask of an answer (the union of its polygons) as a COCO RLE dict.
#[pyfunction]
#[pyo3(signature = (text, width, height, mode = "official", coords = "normalized"))]
fn answer_to_rle(
    py: Python<'_>,
    text: &str,
    width: u32,
    height: u32,
    mode: &str,
    coords: &str,
) -> PyResult<Py<PyAny>> {
    let mask = py.detach(|| answer_mask(text, width, height, mode, coords))?;
    rle_to_py(py, &mask)
}

/// The mask of an answer as a `(height, width)` uint8 array of 0 and 1.
#[pyfunction]
#[pyo3(signature = (text, width, height, mode = "official", coords = "normalized"))]
fn answer_to_mask<'py>(
    py: Python<'py>,
    text: &str,
    width: u32,
    height: u32,
    mode: &str,
    coords: &str,
) -> PyResult<Bound<'py, PyArray2<u8>>> {
    let mask = py.detach(|| answer_mask(text, width, height, mode, coords))?;
    mask_to_array(py, &mask)
}

/// The data script's target string for a mask (contours, `approxPolyDP` with
/// `epsilon_ratio` times the perimeter, normalized to 3 decimals).
#[pyfunction]
#[pyo3(signature = (mask, epsilon_ratio = 0.001))]
fn mask_to_target(mask: &Bound<'_, PyAny>, epsilon_ratio: f64) -> PyResult<String> {
    let rle = mask_from_array(mask)?;
    mask.py()
        .detach(|| simpleseg_core::target::target_from_rle(&rle, epsilon_ratio))
        .map_err(value_error)
}

/// A `(height, width)` array of 0/1 as a COCO RLE dict.
#[pyfunction]
fn rle_encode(py: Python<'_>, mask: &Bound<'_, PyAny>) -> PyResult<Py<PyAny>> {
    rle_to_py(py, &mask_from_array(mask)?)
}

/// A COCO RLE dict (compressed or list counts) as a `(height, width)` uint8 array.
#[pyfunction]
fn rle_decode<'py>(rle: &Bound<'py, PyAny>) -> PyResult<Bound<'py, PyArray2<u8>>> {
    mask_to_array(rle.py(), &rle_from_py(rle)?)
}

/// Foreground pixels.
#[pyfunction]
fn rle_area(rle: &Bound<'_, PyAny>) -> PyResult<u64> {
    Ok(rle_from_py(rle)?.area())
}

/// `[x, y, width, height]` of the foreground (pycocotools' `toBbox`).
#[pyfunction]
fn rle_bbox(rle: &Bound<'_, PyAny>) -> PyResult<[f64; 4]> {
    Ok(rle_from_py(rle)?.bbox())
}

/// IoU of two masks of the same size, as pycocotools' `iou` (0 when both are empty).
#[pyfunction]
fn rle_iou(a: &Bound<'_, PyAny>, b: &Bound<'_, PyAny>) -> PyResult<f64> {
    rle_from_py(a)?.iou(&rle_from_py(b)?).map_err(value_error)
}

/// Union of masks of one size.
#[pyfunction]
fn rle_merge(py: Python<'_>, rles: Vec<Bound<'_, PyAny>>) -> PyResult<Py<PyAny>> {
    let masks = rles.iter().map(rle_from_py).collect::<PyResult<Vec<_>>>()?;
    if masks.is_empty() {
        return Err(PyValueError::new_err("rle_merge needs at least one mask"));
    }
    let merged = RleMask::union_all(&masks).map_err(value_error)?;
    rle_to_py(py, &merged)
}

fn options(
    mode: &str,
    coords: &str,
    centroid_weight: f64,
    format_weight: f64,
    max_points: Option<usize>,
    point_penalty: f64,
) -> PyResult<RewardOptions> {
    for (name, v) in [
        ("centroid_weight", centroid_weight),
        ("format_weight", format_weight),
        ("point_penalty", point_penalty),
    ] {
        if !v.is_finite() || v < 0.0 {
            return Err(PyValueError::new_err(format!(
                "{name} must be a finite number >= 0, got {v}"
            )));
        }
    }
    Ok(RewardOptions {
        mode: parse_mode(mode)?,
        coords: coord_mode(coords)?,
        centroid_weight,
        format_weight,
        max_points,
        point_penalty,
    })
}

/// The IoU reward of `train rl` for one answer: IoU of its union mask with `gt_rle` (0 without
/// a usable polygon), minus `centroid_weight` x squared centroid distance, plus
/// `format_weight` when it parsed, minus `point_penalty` per point beyond `max_points`.
#[pyfunction]
#[pyo3(signature = (answer, gt_rle, mode = "robust", coords = "normalized", centroid_weight = 0.0, format_weight = 0.0, max_points = None, point_penalty = 0.0))]
#[allow(clippy::too_many_arguments)]
fn iou_reward(
    py: Python<'_>,
    answer: &str,
    gt_rle: &Bound<'_, PyAny>,
    mode: &str,
    coords: &str,
    centroid_weight: f64,
    format_weight: f64,
    max_points: Option<usize>,
    point_penalty: f64,
) -> PyResult<f64> {
    let gt = rle_from_py(gt_rle)?;
    let o = options(
        mode,
        coords,
        centroid_weight,
        format_weight,
        max_points,
        point_penalty,
    )?;
    Ok(py.detach(|| reward(answer, &gt, &o).reward))
}

/// [`iou_reward`] for many answers at once, on every core (`threads` to limit), without the
/// GIL. `gt_rles[i]` is answer `i`'s ground truth.
#[pyfunction]
#[pyo3(signature = (answers, gt_rles, mode = "robust", coords = "normalized", centroid_weight = 0.0, format_weight = 0.0, max_points = None, point_penalty = 0.0, threads = None))]
#[allow(clippy::too_many_arguments)]
fn iou_rewards(
    py: Python<'_>,
    answers: Vec<String>,
    gt_rles: Vec<Bound<'_, PyAny>>,
    mode: &str,
    coords: &str,
    centroid_weight: f64,
    format_weight: f64,
    max_points: Option<usize>,
    point_penalty: f64,
    threads: Option<usize>,
) -> PyResult<Vec<f64>> {
    if answers.len() != gt_rles.len() {
        return Err(PyValueError::new_err(format!(
            "{} answers but {} ground truths",
            answers.len(),
            gt_rles.len()
        )));
    }
    let gts = gt_rles
        .iter()
        .map(rle_from_py)
        .collect::<PyResult<Vec<_>>>()?;
    let o = options(
        mode,
        coords,
        centroid_weight,
        format_weight,
        max_points,
        point_penalty,
    )?;
    let run = || -> Vec<f64> {
        answers
            .par_iter()
            .zip(&gts)
            .map(|(a, g)| reward(a, g, &o).reward)
            .collect()
    };
    py.detach(|| match threads {
        Some(n) => rayon::ThreadPoolBuilder::new()
            .num_threads(n.max(1))
            .build()
            .map(|pool| pool.install(run))
            .map_err(value_error),
        None => Ok(run()),
    })
}

/// cIoU, gIoU and Acc@0.5 accumulated over samples, as `simpleseg eval` computes them.
#[pyclass]
#[derive(Default)]
struct Metrics {
    scores: Vec<Score>,
}

#[pymethods]
impl Metrics {
    #[new]
    fn new() -> Self {
        Metrics::default()
    }

    /// Adds a predicted mask against the ground truth and its box `[x, y, w, h]` (the predicted
    /// box is the predicted mask's extent).
    fn add(
        &mut self,
        pred_rle: &Bound<'_, PyAny>,
        gt_rle: &Bound<'_, PyAny>,
        gt_bbox: [f64; 4],
    ) -> PyResult<()> {
        let (pred, gt) = (rle_from_py(pred_rle)?, rle_from_py(gt_rle)?);
        let (intersection, union) = pred.intersection_union(&gt).map_err(value_error)?;
        let pred_box = (pred.area() > 0).then(|| xywh_to_xyxy(pred.bbox()));
        self.scores.push(Score {
            intersection,
            union,
            iou: if union == 0 {
                1.0
            } else {
                intersection as f64 / union as f64
            },
            pred_box,
            box_iou: pred_box.map_or(0.0, |b| box_iou(b, xywh_to_xyxy(gt_bbox))),
            parse_failure: false,
            polygons: 0,
            points: 0,
        });
        Ok(())
    }

    /// Adds a model's answer, decoded as `eval` does.
    #[pyo3(signature = (answer, gt_rle, gt_bbox, mode = "official", coords = "normalized"))]
    fn add_answer(
        &mut self,
        answer: &str,
        gt_rle: &Bound<'_, PyAny>,
        gt_bbox: [f64; 4],
        mode: &str,
        coords: &str,
    ) -> PyResult<()> {
        let gt = rle_from_py(gt_rle)?;
        let score = score_answer(
            answer,
            &gt,
            gt_bbox,
            parse_mode(mode)?,
            coord_mode(coords)?,
            BoxSource::Mask,
        )
        .map_err(value_error)?;
        self.scores.push(score);
        Ok(())
    }

    fn __len__(&self) -> usize {
        self.scores.len()
    }

    #[getter]
    fn ciou(&self) -> f64 {
        aggregate(&self.scores).ciou
    }

    #[getter]
    fn giou(&self) -> f64 {
        aggregate(&self.scores).giou
    }

    #[getter]
    fn acc50(&self) -> f64 {
        aggregate(&self.scores).acc50
    }

    /// `{n, ciou, giou, acc50, parse_failures, mean_points_per_polygon}`.
    fn to_dict(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let m = aggregate(&self.scores);
        to_python(py, &serde_json::to_value(m).map_err(value_error)?)
    }
}

/// Counts of `values` in `bins` equal bins over [`low`, `high`] (values outside go to the end
/// bins): `{"edges": [...], "counts": [...]}`, for logging reward distributions.
#[pyfunction]
#[pyo3(signature = (values, bins = 10, low = 0.0, high = 1.0))]
fn reward_histogram(
    py: Python<'_>,
    values: Vec<f64>,
    bins: usize,
    low: f64,
    high: f64,
) -> PyResult<Py<PyAny>> {
    if bins == 0 || !low.is_finite() || !high.is_finite() || high <= low {
        return Err(PyValueError::new_err(
            "need bins >= 1 and finite low < high",
        ));
    }
    let mut counts = vec![0u64; bins];
    for v in values.iter().filter(|v| v.is_finite()) {
        let i = ((v - low) / (high - low) * bins as f64).floor();
        counts[(i.max(0.0) as usize).min(bins - 1)] += 1;
    }
    let edges: Vec<f64> = (0..=bins)
        .map(|i| low + (high - low) * i as f64 / bins as f64)
        .collect();
    to_python(py, &serde_json::json!({"edges": edges, "counts": counts}))
}

#[pymodule]
fn _simpleseg(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(parse_answer, m)?)?;
    m.add_function(wrap_pyfunction!(answer_to_rle, m)?)?;
    m.add_function(wrap_pyfunction!(answer_to_mask, m)?)?;
    m.add_function(wrap_pyfunction!(mask_to_target, m)?)?;
    m.add_function(wrap_pyfunction!(rle_encode, m)?)?;
    m.add_function(wrap_pyfunction!(rle_decode, m)?)?;
    m.add_function(wrap_pyfunction!(rle_area, m)?)?;
    m.add_function(wrap_pyfunction!(rle_bbox, m)?)?;
    m.add_function(wrap_pyfunction!(rle_iou, m)?)?;
    m.add_function(wrap_pyfunction!(rle_merge, m)?)?;
    m.add_function(wrap_pyfunction!(iou_reward, m)?)?;
    m.add_function(wrap_pyfunction!(iou_rewards, m)?)?;
    m.add_function(wrap_pyfunction!(reward_histogram, m)?)?;
    m.add_class::<Metrics>()?;
    m.add_class::<model::Model>()?;
    m.add_class::<model::Segmentation>()?;
    m.add_class::<model::ChatAnswer>()?;
    Ok(())
}
