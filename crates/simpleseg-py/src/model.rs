//! `simpleseg.Model`: a model folder (or the built-in model) loaded in this process, through
//! the engine's segmentation pipeline and decoding loop, so that answers and masks are the
//! command line's. The GIL is released while the model runs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use numpy::{PyReadonlyArray2, PyReadonlyArray3, PyUntypedArrayMethods};
use pyo3::exceptions::{PyFileNotFoundError, PyOSError, PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyString};
use serde_json::Value;
use simpleseg_core::images::{decode_image, open_image, to_rgb};
use simpleseg_core::segment::Target;
use simpleseg_core::{CoordMode, ParseMode, RleMask};
use simpleseg_engine::io::weights::Quantization;
use simpleseg_engine::runtime::constraint::{Constraint, Grammar, GrammarCache, PatternLimits};
use simpleseg_engine::runtime::segment::{
    segment_batch, SegmentJob, SegmentOptions, SegmentResult,
};
use simpleseg_engine::{
    generate_batch, BatchRequest, GenerationConfig, GenerationOutput, LoadOptions,
    SamplingOverrides, VisionLanguageModel,
};

use crate::{mask_to_array, rle_to_py, to_python};

/// Engine errors as Python's: bad input, files and configurations that cannot be used are
/// `ValueError`, a missing file `FileNotFoundError`, other I/O `OSError`, the rest
/// `RuntimeError`; the messages are the command line's.
fn engine_error(context: Option<&str>, e: simpleseg_engine::Error) -> PyErr {
    use simpleseg_engine::Error as E;
    let message = match context {
        Some(c) => format!("{c}: {e}"),
        None => e.to_string(),
    };
    match &e {
        E::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound => {
            PyFileNotFoundError::new_err(message)
        }
        E::Io { .. } => PyOSError::new_err(message),
        E::MissingFile { .. } => PyFileNotFoundError::new_err(message),
        E::BadFile { .. } | E::BadConfig { .. } | E::Unsupported(_) => {
            PyValueError::new_err(message)
        }
        E::Core(simpleseg_core::Error::Io { source, .. })
            if source.kind() == std::io::ErrorKind::NotFound =>
        {
            PyFileNotFoundError::new_err(message)
        }
        E::Core(simpleseg_core::Error::Io { .. }) => PyOSError::new_err(message),
        E::Input(_) | E::Core(_) | E::Template(_) | E::Tokenizer(_) => {
            PyValueError::new_err(message)
        }
        _ => PyRuntimeError::new_err(message),
    }
}

fn core_error(e: simpleseg_core::Error) -> PyErr {
    engine_error(None, simpleseg_engine::Error::Core(e))
}

/// An image given as a path (`str` or `os.PathLike`), encoded bytes, or a `(height, width, 3)`
/// (RGB), `(height, width, 4)` (RGBA, alpha dropped) or `(height, width)` (grey) uint8 array.
/// A PIL image is turned into an array by the Python wrapper. Paths are read exactly as
/// `simpleseg segment --image` reads them.
fn image_from_py(image: &Bound<'_, PyAny>) -> PyResult<image::RgbImage> {
    if let Ok(bytes) = image.cast::<PyBytes>() {
        let decoded = decode_image(bytes.as_bytes(), Path::new("<bytes>")).map_err(core_error)?;
        return Ok(to_rgb(&decoded));
    }
    if let Ok(array) = image.extract::<PyReadonlyArray3<'_, u8>>() {
        let shape = array.shape();
        let (h, w, c) = (shape[0], shape[1], shape[2]);
        if c != 3 && c != 4 {
            return Err(PyValueError::new_err(format!(
                "an image array is (height, width, 3) or (height, width, 4) uint8, not {shape:?}"
            )));
        }
        let view = array.as_array();
        let rgb: Vec<u8> = (0..h)
            .flat_map(|y| (0..w).flat_map(move |x| (0..3).map(move |k| (y, x, k))))
            .map(|(y, x, k)| view[[y, x, k]])
            .collect();
        return rgb_image(w, h, rgb);
    }
    if let Ok(array) = image.extract::<PyReadonlyArray2<'_, u8>>() {
        let shape = array.shape();
        let rgb: Vec<u8> = array.as_array().iter().flat_map(|&v| [v, v, v]).collect();
        return rgb_image(shape[1], shape[0], rgb);
    }
    // A PIL image (anything with PIL's convert/tobytes/size), converted to RGB as PIL does.
    if image.hasattr("convert")? && image.hasattr("tobytes")? && image.hasattr("size")? {
        let rgb = image.call_method1("convert", ("RGB",))?;
        let (w, h): (usize, usize) = rgb.getattr("size")?.extract()?;
        let bytes = rgb.call_method0("tobytes")?;
        let bytes = bytes
            .cast::<PyBytes>()
            .map_err(|_| PyTypeError::new_err("the image's tobytes() did not give bytes"))?;
        return rgb_image(w, h, bytes.as_bytes().to_vec());
    }
    if image.cast::<PyString>().is_ok() || image.hasattr("__fspath__")? {
        let path: PathBuf = image.extract()?;
        return image.py().detach(|| open_image(&path)).map_err(core_error);
    }
    Err(PyTypeError::new_err(format!(
        "an image is a path, bytes, a numpy uint8 array or a PIL image, not {}",
        image.get_type().name()?
    )))
}

fn rgb_image(width: usize, height: usize, rgb: Vec<u8>) -> PyResult<image::RgbImage> {
    let (w, h) = (u32::try_from(width), u32::try_from(height));
    match (w, h) {
        (Ok(w), Ok(h)) if w > 0 && h > 0 => image::RgbImage::from_raw(w, h, rgb)
            .ok_or_else(|| PyValueError::new_err("the image array's size does not match its data")),
        _ => Err(PyValueError::new_err(
            "an image needs a width and a height of at least 1",
        )),
    }
}

/// The sampling keyword arguments every call takes.
const SAMPLING: &[&str] = &[
    "max_new_tokens",
    "greedy",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
];

fn overrides(kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<SamplingOverrides> {
    let mut o = SamplingOverrides::default();
    let Some(kwargs) = kwargs else {
        return Ok(o);
    };
    for (key, value) in kwargs.iter() {
        let key: String = key.extract()?;
        if value.is_none() {
            continue;
        }
        match key.as_str() {
            "max_new_tokens" => o.max_new_tokens = Some(value.extract()?),
            "greedy" => o.greedy = value.extract()?,
            "temperature" => o.temperature = Some(value.extract()?),
            "top_p" => o.top_p = Some(value.extract()?),
            "top_k" => o.top_k = Some(value.extract()?),
            "repetition_penalty" => o.repetition_penalty = Some(value.extract()?),
            "presence_penalty" => o.presence_penalty = Some(value.extract()?),
            "frequency_penalty" => o.frequency_penalty = Some(value.extract()?),
            "seed" => o.seed = Some(value.extract()?),
            other => {
                return Err(PyTypeError::new_err(format!(
                    "unexpected keyword argument '{other}' (sampling takes {})",
                    SAMPLING.join(", ")
                )))
            }
        }
    }
    Ok(o)
}

/// A numbers argument (`point`, `box`) of exactly `N` values.
fn numbers<const N: usize>(name: &str, value: &Bound<'_, PyAny>) -> PyResult<[f64; N]> {
    let values: Vec<f64> = value
        .extract()
        .map_err(|_| PyValueError::new_err(format!("{name} is a sequence of {N} numbers")))?;
    <[f64; N]>::try_from(values.as_slice()).map_err(|_| {
        PyValueError::new_err(format!(
            "{name} is a sequence of {N} numbers, got {}",
            values.len()
        ))
    })
}

/// What to segment: exactly one of `query`, `point`, `box`.
fn target(
    query: Option<String>,
    point: Option<&Bound<'_, PyAny>>,
    bbox: Option<&Bound<'_, PyAny>>,
) -> PyResult<Target> {
    match (query, point, bbox) {
        (Some(q), None, None) => Ok(Target::Query(q)),
        (None, Some(p), None) => Ok(Target::Point(numbers::<2>("point", p)?)),
        (None, None, Some(b)) => Ok(Target::Box(numbers::<4>("box", b)?)),
        (None, None, None) => Err(PyValueError::new_err("give query, point or box")),
        _ => Err(PyValueError::new_err("give one of query, point and box")),
    }
}

/// A model, loaded once and asked many times.
#[pyclass(module = "simpleseg._simpleseg", frozen)]
pub struct Model {
    model: Box<dyn VisionLanguageModel>,
    name: String,
    /// The worker threads, when the model was given its own number.
    pool: Option<rayon::ThreadPool>,
    grammars: GrammarCache,
}

impl Model {
    fn run<T: Send>(&self, py: Python<'_>, work: impl FnOnce() -> T + Send) -> T {
        py.detach(|| match &self.pool {
            Some(pool) => pool.install(work),
            None => work(),
        })
    }

    fn grammar(
        &self,
        constrain: Option<&str>,
        config: &GenerationConfig,
    ) -> PyResult<Option<Arc<Grammar>>> {
        let Some(name) = constrain else {
            return Ok(None);
        };
        let constraint = match name {
            "polygon" | "box" => name
                .parse::<Constraint>()
                .map_err(|e| PyValueError::new_err(e.to_string()))?,
            other => {
                return Err(PyValueError::new_err(format!(
                    "constrain is \"polygon\" or \"box\", not {other:?}"
                )))
            }
        };
        self.grammars
            .get(self.model.tokenizer(), &config.eos_token_ids, &constraint)
            .map(Some)
            .map_err(|e| engine_error(None, e))
    }

    fn config(&self, kwargs: Option<&Bound<'_, PyDict>>) -> PyResult<GenerationConfig> {
        overrides(kwargs)?
            .apply(self.model.generation_config())
            .map_err(PyValueError::new_err)
    }
}

fn segment_options(
    prompt_template: Option<String>,
    mode: &str,
    coords: &str,
) -> PyResult<SegmentOptions> {
    Ok(SegmentOptions {
        prompt_template,
        mode: mode
            .parse::<ParseMode>()
            .map_err(|e| PyValueError::new_err(e.to_string()))?,
        coords: coords
            .parse::<CoordMode>()
            .map_err(|e| PyValueError::new_err(e.to_string()))?,
        ..SegmentOptions::default()
    })
}

#[pymethods]
impl Model {
    /// Loads a Hugging Face model folder (`path`), or the built-in simpleseg-tiny model when
    /// `path` is None. `quantize`: "q8_0" or "q4k" at load; `dtype`: "auto", "f32", "bf16" or
    /// "f16"; `device`: "cpu", "cuda" or "metal" (a build with that feature); `threads`: the
    /// worker threads of this model's computations (default: every core).
    #[new]
    #[pyo3(signature = (path = None, *, quantize = None, dtype = "auto", device = "cpu", threads = None))]
    fn new(
        py: Python<'_>,
        path: Option<PathBuf>,
        quantize: Option<&str>,
        dtype: &str,
        device: &str,
        threads: Option<usize>,
    ) -> PyResult<Self> {
        let (dir, name) = match path {
            Some(p) => (p.clone(), p.display().to_string()),
            None => (
                simpleseg_builtin::folder().map_err(core_error)?,
                simpleseg_builtin::NAME.to_string(),
            ),
        };
        let quantize = match quantize {
            None => None,
            Some("q8_0") => Some(Quantization::Q8_0),
            Some("q4k") => Some(Quantization::Q4K),
            Some(other) => {
                return Err(PyValueError::new_err(format!(
                    "quantize is \"q8_0\" or \"q4k\", not {other:?}"
                )))
            }
        };
        let dtype = match dtype {
            "auto" => None,
            "f32" => Some(candle_dtype::F32),
            "bf16" => Some(candle_dtype::BF16),
            "f16" => Some(candle_dtype::F16),
            other => {
                return Err(PyValueError::new_err(format!(
                    "dtype is \"auto\", \"f32\", \"bf16\" or \"f16\", not {other:?}"
                )))
            }
        };
        let pool = match threads {
            Some(0) => return Err(PyValueError::new_err("threads must be at least 1")),
            Some(n) => Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n)
                    .build()
                    .map_err(|e| PyRuntimeError::new_err(e.to_string()))?,
            ),
            None => None,
        };
        let device = simpleseg_engine::device(device).map_err(|e| engine_error(None, e))?;
        let options = LoadOptions {
            device,
            dtype,
            quantize,
        };
        let load = || simpleseg_engine::load(&dir, &options);
        let model = py
            .detach(|| match &pool {
                Some(pool) => pool.install(load),
                None => load(),
            })
            .map_err(|e| {
                engine_error(Some(&format!("loading the model in {}", dir.display())), e)
            })?;
        Ok(Model {
            model,
            name,
            pool,
            grammars: GrammarCache::new(PatternLimits::default()),
        })
    }

    /// How the model is named (its folder, or the built-in model's name).
    #[getter]
    fn name(&self) -> &str {
        &self.name
    }

    /// The model's architecture (`config.json`'s `model_type`).
    #[getter]
    fn architecture(&self) -> &str {
        self.model.architecture()
    }

    /// The dtype the model computes in.
    #[getter]
    fn dtype(&self) -> &'static str {
        self.model.dtype().as_str()
    }

    fn __repr__(&self) -> String {
        format!(
            "Model({:?}, architecture={:?}, dtype={:?})",
            self.name,
            self.model.architecture(),
            self.model.dtype().as_str()
        )
    }

    /// Segments one object in `image`: named by `query`, a `point` `[x, y]` on it or a `box`
    /// `[x1, y1, x2, y2]` around it (normalized to [0, 1]). `constrain`: "polygon" or "box";
    /// `prompt_template` replaces the model card's question (`{query}` is filled); `mode` and
    /// `coords` say how the answer is read. Sampling keywords: max_new_tokens, greedy,
    /// temperature (0: greedy), top_p, top_k, repetition_penalty, presence_penalty,
    /// frequency_penalty, seed; without them, the model's defaults (greedy for simpleseg
    /// models).
    #[pyo3(signature = (image, query = None, *, point = None, r#box = None, constrain = None, prompt_template = None, mode = "robust", coords = "normalized", **sampling))]
    #[allow(clippy::too_many_arguments)]
    fn segment(
        &self,
        py: Python<'_>,
        image: &Bound<'_, PyAny>,
        query: Option<String>,
        point: Option<&Bound<'_, PyAny>>,
        r#box: Option<&Bound<'_, PyAny>>,
        constrain: Option<&str>,
        prompt_template: Option<String>,
        mode: &str,
        coords: &str,
        sampling: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Segmentation> {
        let item = (image_from_py(image)?, target(query, point, r#box)?);
        let mut results = self.segment_items(
            py,
            vec![item],
            constrain,
            prompt_template,
            mode,
            coords,
            sampling,
            usize::MAX,
        )?;
        results
            .pop()
            .ok_or_else(|| PyRuntimeError::new_err("the model gave no answer"))
    }

    /// Segments many objects, decoded together `batch_size` at a time (each answer is what
    /// `segment` gives alone). `items`: dicts `{"image", "query" | "point" | "box"}` or
    /// `(image, query)` pairs. Other arguments as `segment`'s, for every item.
    #[pyo3(signature = (items, *, constrain = None, prompt_template = None, mode = "robust", coords = "normalized", batch_size = 8, **sampling))]
    #[allow(clippy::too_many_arguments)]
    fn segment_batch(
        &self,
        py: Python<'_>,
        items: &Bound<'_, PyList>,
        constrain: Option<&str>,
        prompt_template: Option<String>,
        mode: &str,
        coords: &str,
        batch_size: usize,
        sampling: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<Segmentation>> {
        if batch_size == 0 {
            return Err(PyValueError::new_err("batch_size must be at least 1"));
        }
        let mut asked = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let at = |e: PyErr| PyValueError::new_err(format!("item {i}: {}", e.value(py)));
            let parsed = if let Ok(dict) = item.cast::<PyDict>() {
                let image = dict
                    .get_item("image")?
                    .ok_or_else(|| PyValueError::new_err(format!("item {i} has no \"image\"")))?;
                let query: Option<String> =
                    dict.get_item("query")?.map(|q| q.extract()).transpose()?;
                let point = dict.get_item("point")?;
                let bbox = dict.get_item("box")?;
                (
                    image_from_py(&image).map_err(at)?,
                    target(query, point.as_ref(), bbox.as_ref()).map_err(at)?,
                )
            } else {
                let (image, query): (Bound<'_, PyAny>, String) = item.extract().map_err(|_| {
                    PyTypeError::new_err(format!("item {i} is a dict or an (image, query) pair"))
                })?;
                (image_from_py(&image).map_err(at)?, Target::Query(query))
            };
            asked.push(parsed);
        }
        self.segment_items(
            py,
            asked,
            constrain,
            prompt_template,
            mode,
            coords,
            sampling,
            batch_size,
        )
    }

    /// Asks about `image` and returns the answer: a `ChatAnswer` (its `str()` is the text),
    /// or a list of `n` sampled answers from one prefill (answer i seeded `seed + i`).
    /// `system` replaces the chat template's default system message. Sampling keywords as
    /// `segment`'s.
    #[pyo3(signature = (image, prompt, n = 1, *, system = None, constrain = None, **sampling))]
    #[allow(clippy::too_many_arguments)]
    fn chat(
        &self,
        py: Python<'_>,
        image: &Bound<'_, PyAny>,
        prompt: &str,
        n: usize,
        system: Option<String>,
        constrain: Option<&str>,
        sampling: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Py<PyAny>> {
        if n == 0 {
            return Err(PyValueError::new_err("n must be at least 1"));
        }
        let config = self.config(sampling)?;
        if n > 1 && !config.do_sample {
            return Err(PyValueError::new_err(format!(
                "n={n} needs sampling: greedy decoding gives one answer n times (give temperature, top_p, top_k or seed)"
            )));
        }
        let grammar = self.grammar(constrain, &config)?;
        let rgb = image_from_py(image)?;
        let model = self.model.as_ref();
        let options = simpleseg_engine::PromptOptions {
            system,
            ..Default::default()
        };
        let configs: Vec<GenerationConfig> = (0..n as u64)
            .map(|i| GenerationConfig {
                seed: config.seed.wrapping_add(i),
                ..config.clone()
            })
            .collect();
        let outputs = self
            .run(py, || -> simpleseg_engine::Result<Vec<GenerationOutput>> {
                let prompt = model.prepare_with(&rgb, prompt, &options)?;
                generate_batch(
                    model,
                    &[BatchRequest {
                        prompt: &prompt,
                        configs: configs.clone(),
                        grammar,
                    }],
                    |_, _| {},
                )
            })
            .map_err(|e| engine_error(None, e))?;
        let answers: Vec<ChatAnswer> = outputs
            .into_iter()
            .zip(&configs)
            .map(|(output, c)| ChatAnswer {
                seed: c.do_sample.then_some(c.seed),
                output,
            })
            .collect();
        if n == 1 {
            let answer = answers
                .into_iter()
                .next()
                .ok_or_else(|| PyRuntimeError::new_err("no answer"))?;
            Ok(Py::new(py, answer)?.into_any())
        } else {
            Ok(PyList::new(
                py,
                answers
                    .into_iter()
                    .map(|a| Py::new(py, a))
                    .collect::<PyResult<Vec<_>>>()?,
            )?
            .into_any()
            .unbind())
        }
    }
}

impl Model {
    #[allow(clippy::too_many_arguments)]
    fn segment_items(
        &self,
        py: Python<'_>,
        items: Vec<(image::RgbImage, Target)>,
        constrain: Option<&str>,
        prompt_template: Option<String>,
        mode: &str,
        coords: &str,
        sampling: Option<&Bound<'_, PyDict>>,
        batch_size: usize,
    ) -> PyResult<Vec<Segmentation>> {
        let config = self.config(sampling)?;
        let grammar = self.grammar(constrain, &config)?;
        let options = segment_options(prompt_template, mode, coords)?;
        let model = self.model.as_ref();
        let results = self
            .run(py, || -> simpleseg_engine::Result<Vec<SegmentResult>> {
                let mut results = Vec::with_capacity(items.len());
                for chunk in items.chunks(batch_size.max(1)) {
                    let jobs = chunk
                        .iter()
                        .map(|(image, target)| SegmentJob::new(model, image, target, &options))
                        .collect::<simpleseg_engine::Result<Vec<_>>>()?;
                    let configs = vec![config.clone(); jobs.len()];
                    results.extend(segment_batch(
                        model,
                        &jobs,
                        &configs,
                        grammar.clone(),
                        |_, _| {},
                    )?);
                }
                Ok(results)
            })
            .map_err(|e| engine_error(None, e))?;
        Ok(results
            .into_iter()
            .map(|r| Segmentation {
                json: r.to_json(),
                mask: r.segmentation.mask,
            })
            .collect())
    }
}

/// Dtype names without a dependency on candle in this crate's API.
mod candle_dtype {
    pub use candle_core::DType::{BF16, F16, F32};
}

/// A segmentation: the answer, its polygons and its mask, as `simpleseg segment --json`
/// prints them (`to_dict()`), with the mask also as an array.
#[pyclass(module = "simpleseg._simpleseg", frozen)]
pub struct Segmentation {
    json: Value,
    mask: RleMask,
}

impl Segmentation {
    fn field(&self, py: Python<'_>, key: &str) -> PyResult<Py<PyAny>> {
        to_python(py, &self.json[key])
    }
}

#[pymethods]
impl Segmentation {
    /// The model's answer.
    #[getter]
    fn answer(&self) -> String {
        self.json["answer"].as_str().unwrap_or_default().to_string()
    }
    /// The question asked.
    #[getter]
    fn prompt(&self) -> String {
        self.json["prompt"].as_str().unwrap_or_default().to_string()
    }
    /// The polygons, normalized to [0, 1].
    #[getter]
    fn polygons(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.field(py, "polygons")
    }
    /// The polygons in pixels of the image.
    #[getter]
    fn polygons_pixels(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.field(py, "polygons_pixels")
    }
    /// The mask: a `(height, width)` uint8 array of 0 and 1.
    #[getter]
    fn mask<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, numpy::PyArray2<u8>>> {
        mask_to_array(py, &self.mask)
    }
    /// The mask as a COCO RLE dict `{"size": [h, w], "counts": str}`.
    #[getter]
    fn rle(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        rle_to_py(py, &self.mask)
    }
    /// `[x, y, width, height]` of the mask.
    #[getter]
    fn bbox(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.field(py, "bbox")
    }
    /// Foreground pixels.
    #[getter]
    fn area(&self) -> u64 {
        self.mask.area()
    }
    /// The outline as SVG path data in pixels.
    #[getter]
    fn svg(&self) -> String {
        self.json["svg"].as_str().unwrap_or_default().to_string()
    }
    /// What the parser could not use: `{kind, message}` dicts.
    #[getter]
    fn warnings(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.field(py, "warnings")
    }
    /// `{prefill_ms, decode_ms, decode_tokens_per_s}`.
    #[getter]
    fn timings(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.field(py, "timings")
    }
    /// Why the answer ended: "eos", "max_tokens", "cancelled" or "no_allowed_token".
    #[getter]
    fn stop_reason(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.field(py, "stop_reason")
    }
    /// The answer's token ids.
    #[getter]
    fn token_ids(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        self.field(py, "token_ids")
    }
    /// Everything as a dict: the object `simpleseg segment --json` prints.
    fn to_dict(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_python(py, &self.json)
    }
    fn __repr__(&self) -> String {
        format!(
            "Segmentation(answer={:?}, polygons={}, area={})",
            self.json["answer"].as_str().unwrap_or_default(),
            self.json["polygons"].as_array().map_or(0, Vec::len),
            self.mask.area()
        )
    }
}

/// A chat answer; `str(answer)` is its text.
#[pyclass(module = "simpleseg._simpleseg", frozen)]
pub struct ChatAnswer {
    output: GenerationOutput,
    seed: Option<u64>,
}

#[pymethods]
impl ChatAnswer {
    /// The answer's text.
    #[getter]
    fn text(&self) -> &str {
        &self.output.text
    }
    /// Its token ids.
    #[getter]
    fn token_ids(&self) -> Vec<u32> {
        self.output.token_ids.clone()
    }
    /// The prompt's length in tokens.
    #[getter]
    fn prompt_tokens(&self) -> usize {
        self.output.prompt_tokens
    }
    /// Why it ended: "eos", "max_tokens", "cancelled" or "no_allowed_token".
    #[getter]
    fn stop_reason(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_python(py, &serde_json::json!(self.output.stop_reason))
    }
    /// The sampler's seed, when sampled.
    #[getter]
    fn seed(&self) -> Option<u64> {
        self.seed
    }
    /// `{prefill_ms, decode_ms, decode_tokens_per_s}`.
    #[getter]
    fn timings(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        to_python(py, &serde_json::json!(self.output.timings))
    }
    /// The fields of `simpleseg chat --json`.
    fn to_dict(&self, py: Python<'_>) -> PyResult<Py<PyAny>> {
        let o = &self.output;
        to_python(
            py,
            &serde_json::json!({
                "text": o.text,
                "token_ids": o.token_ids,
                "prompt_tokens": o.prompt_tokens,
                "stop_reason": o.stop_reason,
                "seed": self.seed,
                "timings": o.timings,
            }),
        )
    }
    fn __str__(&self) -> &str {
        &self.output.text
    }
    fn __repr__(&self) -> String {
        format!("ChatAnswer({:?})", self.output.text)
    }
}
