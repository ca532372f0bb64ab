//! Where a model's tensors come from, and in what form its linear layers keep them.
//!
//! [`Weights`] stands where candle's `VarBuilder` would: model code asks it for tensors by name
//! (`pp`, `get`) and for linear layers (`linear`). Its sources:
//!
//! - a model folder's safetensors files or GGUF file, memory-mapped. A linear layer's BF16 or
//!   F16 weight is used as stored, straight from the map ([`MappedMatrix`]): loading copies
//!   nothing, and resident memory is what the computation touches. Under
//!   [`Weights::quantized`], linear weights are quantized at load instead (candle's q8_0 / q4k),
//!   and a GGUF file's quantized tensors load as they are;
//! - a candle `VarBuilder` (training's variables);
//! - a [`LoadingPlan`], which records what is asked for without any weights.
//!
//! Small tensors (norms, biases, position tables) are copied into candle tensors of the
//! compute dtype.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Result as CResult, Shape, Tensor};
use candle_nn::VarBuilder;
use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::io::quantized::QuantizedMatrix;

/// A quantized format for linear layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Quantization {
    Q8_0,
    Q4K,
}

impl Quantization {
    /// The ggml type of the format.
    pub fn ggml(self) -> GgmlDType {
        match self {
            Quantization::Q8_0 => GgmlDType::Q8_0,
            Quantization::Q4K => GgmlDType::Q4K,
        }
    }

    /// The lowercase name used on command lines and in files.
    pub fn name(self) -> &'static str {
        match self {
            Quantization::Q8_0 => "q8_0",
            Quantization::Q4K => "q4k",
        }
    }

    /// The type a weight of `in_dim` columns gets: the format when its blocks divide the row;
    /// else, for q4k (blocks of 256), q4_0 (blocks of 32, the same 4.5 bits per weight) when
    /// those do; else none (kept as stored). llama.cpp falls back likewise for rows that are
    /// not a multiple of 256 (to q5_0; candle has fast kernels for q4_0, not q5_0).
    pub fn for_row(self, in_dim: usize) -> Option<GgmlDType> {
        let candidates: &[GgmlDType] = match self {
            Quantization::Q8_0 => &[GgmlDType::Q8_0],
            Quantization::Q4K => &[GgmlDType::Q4K, GgmlDType::Q4_0],
        };
        candidates
            .iter()
            .copied()
            .find(|t| in_dim.is_multiple_of(t.block_size()))
    }
}

impl std::str::FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "q8_0" => Ok(Quantization::Q8_0),
            "q4k" => Ok(Quantization::Q4K),
            other => Err(format!(
                "unknown quantization '{other}' (expected q8_0 or q4k)"
            )),
        }
    }
}

/// How a weight matrix `(out_dim, in_dim)` is kept.
#[derive(Clone, Debug)]
pub enum Weight {
    /// A candle tensor (training's variables, small models, GPUs).
    Dense(Tensor),
    /// BF16/F16/F32 values read in place from the memory-mapped checkpoint.
    Mapped(MappedMatrix),
    /// Quantized blocks on the CPU (q4k, q4_0, q8_0), mapped or in memory.
    Quantized(QuantizedMatrix),
    /// Quantized on a GPU, multiplied by candle's kernels there.
    QuantizedDevice(Arc<QMatMul>),
}

impl Weight {
    /// `(out_dim, in_dim)`.
    pub fn dims(&self) -> CResult<(usize, usize)> {
        match self {
            Weight::Dense(t) => t.dims2(),
            Weight::Mapped(m) => Ok((m.rows, m.cols)),
            Weight::Quantized(q) => Ok((q.rows, q.cols)),
            Weight::QuantizedDevice(q) => match q.as_ref() {
                QMatMul::QTensor(t) => t.shape().dims2(),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dims2(),
            },
        }
    }

    /// The weight as a candle tensor of `dtype` (a copy unless dense already).
    pub fn to_tensor(&self, dtype: DType, device: &candle_core::Device) -> CResult<Tensor> {
        match self {
            Weight::Dense(t) => t.to_dtype(dtype),
            Weight::Mapped(m) => m.to_tensor(dtype, device),
            Weight::Quantized(q) => {
                Tensor::from_vec(q.dequantize(), (q.rows, q.cols), device)?.to_dtype(dtype)
            }
            Weight::QuantizedDevice(q) => match q.as_ref() {
                QMatMul::QTensor(t) => t.dequantize(device)?.to_dtype(dtype),
                QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.to_dtype(dtype),
            },
        }
    }
}

/// A weight matrix `(rows, cols)` of BF16, F16 or F32 values read in place from a memory map.
#[derive(Clone)]
pub struct MappedMatrix {
    map: Arc<Mmap>,
    start: usize,
    pub rows: usize,
    pub cols: usize,
    pub dtype: DType,
}

impl std::fmt::Debug for MappedMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MappedMatrix({}x{} {:?})",
            self.rows, self.cols, self.dtype
        )
    }
}

impl MappedMatrix {
    fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.start + self.rows * self.cols * self.dtype.size_in_bytes()]
    }

    /// The values as BF16 (for a BF16 matrix).
    pub fn bf16(&self) -> &[half::bf16] {
        bytemuck::cast_slice(self.bytes())
    }

    /// The values as F16 (for an F16 matrix).
    pub fn f16(&self) -> &[half::f16] {
        bytemuck::cast_slice(self.bytes())
    }

    /// The values as F32 (for an F32 matrix).
    pub fn f32(&self) -> &[f32] {
        bytemuck::cast_slice(self.bytes())
    }

    /// Row `r` widened to f32 into `out`.
    pub fn row_into(&self, r: usize, out: &mut [f32]) {
        let (a, b) = (r * self.cols, (r + 1) * self.cols);
        match self.dtype {
            DType::F16 => {
                use half::slice::HalfFloatSliceExt;
                self.f16()[a..b].convert_to_f32_slice(out)
            }
            DType::F32 => out.copy_from_slice(&self.f32()[a..b]),
            _ => simpleseg_kernels::dot::widen_bf16(&self.bf16()[a..b], out),
        }
    }

    /// The matrix as a candle tensor of `dtype` (a copy).
    pub fn to_tensor(&self, dtype: DType, device: &Device) -> CResult<Tensor> {
        let t = match self.dtype {
            DType::F16 => Tensor::from_slice(self.f16(), (self.rows, self.cols), device)?,
            DType::F32 => Tensor::from_slice(self.f32(), (self.rows, self.cols), device)?,
            _ => Tensor::from_slice(self.bf16(), (self.rows, self.cols), device)?,
        };
        t.to_dtype(dtype)
    }
}

/// How a tensor is stored in a file.
#[derive(Clone, Debug)]
enum Stored {
    /// Safetensors' element type.
    Plain(safetensors::Dtype),
    /// A GGUF tensor of this ggml type.
    Ggml(GgmlDType),
}

#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    start: usize,
    end: usize,
    shape: Vec<usize>,
    stored: Stored,
}

/// The tensors of a model folder's files, memory-mapped.
pub struct TensorFiles {
    maps: Vec<(PathBuf, Arc<Mmap>)>,
    entries: HashMap<String, Entry>,
}

impl TensorFiles {
    /// Maps safetensors files.
    pub fn safetensors(files: &[PathBuf]) -> Result<Self> {
        let mut maps = Vec::new();
        let mut entries = HashMap::new();
        for (i, path) in files.iter().enumerate() {
            let map = map_file(path)?;
            let (header, metadata) =
                safetensors::SafeTensors::read_metadata(&map[..]).map_err(|e| Error::BadFile {
                    path: path.clone(),
                    message: format!("not a readable safetensors file: {e}"),
                })?;
            let data = 8 + header;
            for (name, info) in metadata.tensors() {
                entries.insert(
                    name,
                    Entry {
                        file: i,
                        start: data + info.data_offsets.0,
                        end: data + info.data_offsets.1,
                        shape: info.shape.clone(),
                        stored: Stored::Plain(info.dtype),
                    },
                );
            }
            maps.push((path.clone(), Arc::new(map)));
        }
        Ok(TensorFiles { maps, entries })
    }

    /// Maps a GGUF file (tensor names as the checkpoint's, as `simpleseg quantize` writes them).
    pub fn gguf(path: &Path) -> Result<Self> {
        let bad = |message: String| Error::BadFile {
            path: path.to_path_buf(),
            message,
        };
        let mut file = std::fs::File::open(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = gguf_file::Content::read(&mut file)
            .map_err(|e| bad(format!("not a readable GGUF file: {e}")))?;
        let map = map_file(path)?;
        let base = content.tensor_data_offset as usize;
        let mut entries = HashMap::new();
        for (name, info) in &content.tensor_infos {
            let dims = info.shape.dims().to_vec();
            let elems: usize = dims.iter().product();
            let t = info.ggml_dtype;
            let size = elems / t.block_size() * t.type_size();
            let start = base + info.offset as usize;
            if start + size > map.len() || !elems.is_multiple_of(t.block_size()) {
                return Err(bad(format!("tensor {name} runs past the end of the file")));
            }
            let stored = match t {
                GgmlDType::F32 => Stored::Plain(safetensors::Dtype::F32),
                GgmlDType::F16 => Stored::Plain(safetensors::Dtype::F16),
                GgmlDType::BF16 => Stored::Plain(safetensors::Dtype::BF16),
                other => Stored::Ggml(other),
            };
            entries.insert(
                name.clone(),
                Entry {
                    file: 0,
                    start,
                    end: start + size,
                    shape: dims,
                    stored,
                },
            );
        }
        for (key, value) in &content.metadata {
            let Some(name) = key.strip_prefix(SHAPE_KEY) else {
                continue;
            };
            let shape: Option<Vec<usize>> = value
                .to_string()
                .ok()
                .and_then(|s| serde_json::from_str(s).ok());
            match (shape, entries.get_mut(name)) {
                (Some(shape), Some(e))
                    if shape.iter().product::<usize>() == e.shape.iter().product::<usize>() =>
                {
                    e.shape = shape
                }
                _ => return Err(bad(format!("metadata {key} does not fit its tensor"))),
            }
        }
        Ok(TensorFiles {
            maps: vec![(path.to_path_buf(), Arc::new(map))],
            entries,
        })
    }

    /// Names of every tensor.
    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.entries.keys()
    }

    /// A tensor's shape and stored type (plain floating-point or quantized); an error names
    /// tensors of other types.
    pub fn stored(&self, name: &str) -> Result<(Vec<usize>, GgmlDType)> {
        let e = self.entry(name)?;
        let t = match &e.stored {
            Stored::Plain(safetensors::Dtype::F32) => GgmlDType::F32,
            Stored::Plain(safetensors::Dtype::F16) => GgmlDType::F16,
            Stored::Plain(safetensors::Dtype::BF16) => GgmlDType::BF16,
            Stored::Ggml(t) => *t,
            Stored::Plain(other) => {
                return Err(Error::BadFile {
                    path: self.maps[e.file].0.clone(),
                    message: format!("{name}: {other:?} tensors cannot be written to GGUF"),
                })
            }
        };
        Ok((e.shape.clone(), t))
    }

    /// Bytes of all tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.entries
            .values()
            .map(|e| (e.end - e.start) as u64)
            .sum()
    }

    /// A tensor's bytes as stored.
    pub fn raw_bytes(&self, name: &str) -> Result<&[u8]> {
        Ok(self.bytes(self.entry(name)?))
    }

    /// A copy of a tensor in f32 on the CPU (dequantized if quantized).
    pub fn tensor_f32(&self, name: &str) -> Result<Tensor> {
        Ok(self.tensor(name, DType::F32, &Device::Cpu)?)
    }

    /// Names and shapes of every tensor.
    pub fn shapes(&self) -> impl Iterator<Item = (&String, &Vec<usize>)> {
        self.entries.iter().map(|(n, e)| (n, &e.shape))
    }

    fn entry(&self, name: &str) -> CResult<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("cannot find tensor {name}")))
    }

    fn bytes(&self, e: &Entry) -> &[u8] {
        &self.maps[e.file].1[e.start..e.end]
    }

    /// A copy of a plain tensor as a candle tensor of `dtype`.
    fn tensor(&self, name: &str, dtype: DType, device: &Device) -> CResult<Tensor> {
        let e = self.entry(name)?;
        let bytes = self.bytes(e);
        let t = match &e.stored {
            Stored::Plain(stored) => {
                let stored = plain_dtype(*stored).ok_or_else(|| {
                    candle_core::Error::Msg(format!("{name}: {stored:?} tensors are not read"))
                })?;
                Tensor::from_raw_buffer(bytes, stored, &e.shape, device)?
            }
            Stored::Ggml(t) => self.qtensor(name, e, *t, device)?.dequantize(device)?,
        };
        t.to_dtype(dtype)
    }

    fn qtensor(&self, name: &str, e: &Entry, t: GgmlDType, device: &Device) -> CResult<QTensor> {
        let storage = candle_core::quantized::QStorage::from_data(
            std::borrow::Cow::Borrowed(self.bytes(e)),
            device,
            t,
        )
        .map_err(|err| candle_core::Error::Msg(format!("{name}: {err}")))?;
        QTensor::new(storage, e.shape.as_slice())
    }

    /// The weight of a linear layer: mapped in place, quantized, or a copy.
    fn weight(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
        quantize: Option<Quantization>,
    ) -> CResult<Weight> {
        let e = self.entry(name)?;
        let [rows, cols] = e.shape[..] else {
            return Err(candle_core::Error::Msg(format!(
                "{name}: a linear weight is a matrix"
            )));
        };
        if let Stored::Ggml(t) = e.stored {
            if device.is_cpu() && crate::io::quantized::supported(t) {
                let map = self.maps[e.file].1.clone();
                return Ok(Weight::Quantized(QuantizedMatrix::mapped(
                    map, e.start, rows, cols, t,
                )?));
            }
            let q = self.qtensor(name, e, t, device)?;
            return Ok(Weight::QuantizedDevice(Arc::new(QMatMul::from_qtensor(q)?)));
        }
        if let Some(t) = quantize.and_then(|q| q.for_row(cols)) {
            let full = self.tensor(name, DType::F32, device)?;
            let q = quantize_rows(&full, t)?;
            if device.is_cpu() {
                let bytes = q.data()?;
                return Ok(Weight::Quantized(QuantizedMatrix::owned(
                    &bytes, rows, cols, t,
                )?));
            }
            return Ok(Weight::QuantizedDevice(Arc::new(QMatMul::from_qtensor(q)?)));
        }
        let stored = match e.stored {
            Stored::Plain(safetensors::Dtype::BF16) => Some(DType::BF16),
            Stored::Plain(safetensors::Dtype::F16) => Some(DType::F16),
            Stored::Plain(safetensors::Dtype::F32) => Some(DType::F32),
            _ => None,
        };
        if let Some(stored) = stored.filter(|_| device.is_cpu()) {
            let aligned = (self.maps[e.file].1.as_ptr() as usize + e.start)
                .is_multiple_of(stored.size_in_bytes());
            if aligned {
                return Ok(Weight::Mapped(MappedMatrix {
                    map: self.maps[e.file].1.clone(),
                    start: e.start,
                    rows,
                    cols,
                    dtype: stored,
                }));
            }
        }
        Ok(Weight::Dense(self.tensor(name, dtype, device)?))
    }
}

/// `weight` `(rows, cols)` (f32) quantized to `t`, bands of rows in parallel: ggml blocks never
/// straddle rows, so the bands' bytes laid end to end are the whole matrix's.
pub fn quantize_rows(weight: &Tensor, t: GgmlDType) -> CResult<QTensor> {
    use rayon::prelude::*;

    let (rows, cols) = weight.dims2()?;
    let device = weight.device();
    if !device.is_cpu() {
        return QTensor::quantize(weight, t);
    }
    // Each band gets its own storage: candle's quantize reads a tensor's storage from its
    // start, whatever view the tensor is.
    let values: Vec<f32> = weight.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let band = rows.div_ceil(4 * rayon::current_num_threads()).max(1);
    let parts = values
        .par_chunks(band * cols.max(1))
        .map(|chunk| {
            let part = Tensor::from_slice(chunk, (chunk.len() / cols.max(1), cols), device)?;
            QTensor::quantize(&part, t)?.data().map(|d| d.into_owned())
        })
        .collect::<CResult<Vec<Vec<u8>>>>()?;
    let storage = candle_core::quantized::QStorage::from_data(
        std::borrow::Cow::Owned(parts.concat()),
        device,
        t,
    )?;
    QTensor::new(storage, (rows, cols))
}

fn plain_dtype(d: safetensors::Dtype) -> Option<DType> {
    Some(match d {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::F64 => DType::F64,
        safetensors::Dtype::U8 => DType::U8,
        safetensors::Dtype::U32 => DType::U32,
        safetensors::Dtype::I64 => DType::I64,
        _ => return None,
    })
}

fn map_file(path: &Path) -> Result<Mmap> {
    let file = std::fs::File::open(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    // SAFETY: the file is only read; changing it while it is mapped is the user's mistake and at
    // worst yields wrong weights, as with any memory-mapped loader.
    unsafe { Mmap::map(&file) }.map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// What a model asked for, `(name, shape, role)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorRequest {
    pub name: String,
    pub shape: Vec<usize>,
    /// For a linear layer's weight: the quantization it would get (`None` when kept as is).
    pub linear: Option<Option<Quantization>>,
}

/// A loading plan: what a model asks its [`Weights`] for, recorded without any weights. Each
/// request is answered with a zero tensor of the asked shape that takes no memory (a broadcast
/// view), so a model of any size can be "loaded" to list the tensors it reads.
#[derive(Clone, Default)]
pub struct LoadingPlan {
    requests: Arc<Mutex<Vec<TensorRequest>>>,
    /// The tensors that exist, when known (else every name is taken to exist).
    names: Option<Arc<std::collections::HashSet<String>>>,
}

impl LoadingPlan {
    /// A plan for a checkpoint holding exactly these tensors (what `contains` answers).
    pub fn with_names(names: impl IntoIterator<Item = String>) -> Self {
        LoadingPlan {
            requests: Arc::default(),
            names: Some(Arc::new(names.into_iter().collect())),
        }
    }

    /// The tensors asked for, in order.
    pub fn requests(&self) -> Vec<TensorRequest> {
        self.requests
            .lock()
            .map(|r| r.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    fn record(&self, name: String, shape: Vec<usize>, linear: Option<Option<Quantization>>) {
        if let Ok(mut r) = self.requests.lock() {
            r.push(TensorRequest {
                name,
                shape,
                linear,
            });
        }
    }
}

enum Source {
    Files(TensorFiles),
    Builder(VarBuilder<'static>),
    Plan(LoadingPlan),
}

/// A model's tensors under a name prefix. See the module documentation.
#[derive(Clone)]
pub struct Weights {
    source: Arc<Source>,
    prefix: String,
    dtype: DType,
    device: Device,
    quantize: Option<Quantization>,
}

impl Weights {
    /// The tensors of files.
    pub fn from_files(files: TensorFiles, dtype: DType, device: &Device) -> Self {
        Weights::new(Source::Files(files), dtype, device)
    }

    /// Training's variables (or any candle `VarBuilder`).
    pub fn from_var_builder(vb: VarBuilder<'static>) -> Self {
        let (dtype, device) = (vb.dtype(), vb.device().clone());
        Weights::new(Source::Builder(vb), dtype, &device)
    }

    /// A recording of what a model asks for.
    pub fn plan(plan: &LoadingPlan, dtype: DType) -> Self {
        Weights::new(Source::Plan(plan.clone()), dtype, &Device::Cpu)
    }

    fn new(source: Source, dtype: DType, device: &Device) -> Self {
        Weights {
            source: Arc::new(source),
            prefix: String::new(),
            dtype,
            device: device.clone(),
            quantize: None,
        }
    }

    /// The compute dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device tensors are put on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Every tensor name of the source (a plan's when it knows them; none for a builder).
    pub fn names(&self) -> Vec<String> {
        match &*self.source {
            Source::Files(f) => f.names().cloned().collect(),
            Source::Plan(p) => p.names.iter().flat_map(|n| n.iter().cloned()).collect(),
            Source::Builder(_) => Vec::new(),
        }
    }

    /// The weights under `name`.
    pub fn pp(&self, name: impl ToString) -> Weights {
        let mut w = self.clone();
        w.prefix = self.name(&name.to_string());
        w
    }

    /// These weights with another compute dtype (for tensors kept in f32 whatever the model's).
    pub fn with_dtype(&self, dtype: DType) -> Weights {
        let mut w = self.clone();
        w.dtype = dtype;
        w
    }

    /// These weights with linear layers quantized at load to `format` (where the files hold
    /// them unquantized).
    pub fn quantized(&self, format: Option<Quantization>) -> Weights {
        let mut w = self.clone();
        w.quantize = format;
        w
    }

    fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Whether the tensor `name` exists (a plan without names says yes to everything).
    pub fn contains(&self, name: &str) -> bool {
        let full = self.name(name);
        match &*self.source {
            Source::Files(f) => f.entries.contains_key(&full),
            Source::Builder(vb) => vb.contains_tensor(&full),
            Source::Plan(p) => p.names.as_ref().is_none_or(|n| n.contains(&full)),
        }
    }

    /// The tensor `name` of `shape`, in the compute dtype.
    pub fn get<S: Into<Shape>>(&self, shape: S, name: &str) -> CResult<Tensor> {
        let shape = shape.into();
        let full = self.name(name);
        let t = match &*self.source {
            Source::Files(f) => f.tensor(&full, self.dtype, &self.device)?,
            Source::Builder(vb) => vb.get(shape.clone(), &full)?,
            Source::Plan(p) => {
                p.record(full.clone(), shape.dims().to_vec(), None);
                Tensor::zeros((), self.dtype, &self.device)?.broadcast_as(shape.clone())?
            }
        };
        if t.shape() != &shape {
            return Err(candle_core::Error::Msg(format!(
                "shape mismatch for {full}, expected {shape:?}, got {:?}",
                t.shape()
            )));
        }
        Ok(t)
    }

    /// The matrix `weight` `(out_dim, in_dim)` under these weights, kept as the source and
    /// the quantization ask ([`Weight`]).
    pub fn matrix(&self, in_dim: usize, out_dim: usize) -> CResult<Weight> {
        let full = self.name("weight");
        Ok(match &*self.source {
            Source::Files(f) => {
                let e = f.entry(&full)?;
                if e.shape != [out_dim, in_dim] {
                    return Err(candle_core::Error::Msg(format!(
                        "shape mismatch for {full}, expected [{out_dim}, {in_dim}], got {:?}",
                        e.shape
                    )));
                }
                f.weight(&full, self.dtype, &self.device, self.quantize)?
            }
            Source::Builder(vb) => Weight::Dense(vb.get((out_dim, in_dim), &full)?),
            Source::Plan(p) => {
                p.record(
                    full,
                    vec![out_dim, in_dim],
                    Some(self.quantize.and_then(|q| q.for_row(in_dim).map(|_| q))),
                );
                Weight::Dense(
                    Tensor::zeros((), self.dtype, &self.device)?.broadcast_as((out_dim, in_dim))?,
                )
            }
        })
    }
}

/// Metadata key prefix of a GGUF tensor's true shape when it has more than 4 dimensions (the
/// value is the shape as a JSON list; the file holds the trailing dimensions folded).
pub const SHAPE_KEY: &str = "simpleseg.shape.";

/// The file a quantized folder keeps its weights in.
pub const GGUF_FILE: &str = "model.gguf";

/// The model folder's weight files: [`GGUF_FILE`] (a quantized folder) or its safetensors.
pub fn folder_weight_files(folder: &crate::io::hf::HfFolder) -> Result<Vec<PathBuf>> {
    let gguf = folder.path(GGUF_FILE);
    if gguf.is_file() {
        return Ok(vec![gguf]);
    }
    folder.safetensors_files()
}

/// The model folder's weights, memory-mapped: [`GGUF_FILE`] or its safetensors.
pub fn folder_files(folder: &crate::io::hf::HfFolder) -> Result<TensorFiles> {
    let gguf = folder.path(GGUF_FILE);
    if gguf.is_file() {
        return TensorFiles::gguf(&gguf);
    }
    TensorFiles::safetensors(&folder.safetensors_files()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layers::linear::bf16_bits;
    use crate::layers::{max_abs_diff, Linear};
    use candle_core::Module;

    /// BF16 bits of a tensor, for exact comparisons.
    fn bits(t: &Tensor) -> Vec<u16> {
        bf16_bits(t).unwrap()
    }

    /// A random BF16 tensor of standard normal values times `scale`.
    fn random_bf16(shape: impl Into<candle_core::Shape>, scale: f64) -> Tensor {
        (Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap() * scale)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
    }

    /// A safetensors file holding `w` (512 x 256 weights) in BF16, F16 and F32, and another
    /// 512 x 256 BF16 weight (`other`).
    fn files(dir: &Path) -> (Tensor, TensorFiles) {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 0.05, (512, 256), &dev)
            .unwrap()
            .to_dtype(DType::BF16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let tensors: HashMap<String, Tensor> = [
            ("bf16.weight", w.to_dtype(DType::BF16).unwrap()),
            ("f16.weight", w.to_dtype(DType::F16).unwrap()),
            ("f32.weight", w.clone()),
            (
                "other.weight",
                Tensor::randn(0f32, 0.05, (512, 256), &dev)
                    .unwrap()
                    .to_dtype(DType::BF16)
                    .unwrap(),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("model.safetensors");
        candle_core::safetensors::save(&tensors, &path).unwrap();
        (w, TensorFiles::safetensors(&[path]).unwrap())
    }

    #[test]
    fn mapped_and_quantized_layers_compute_the_dense_product() {
        let dir = std::env::temp_dir().join(format!("simpleseg-weights-{}", std::process::id()));
        let (w, files) = files(&dir);
        let weights = Weights::from_files(files, DType::F32, &Device::Cpu);
        for rows in [1, 5, 40] {
            let x = Tensor::randn(0f32, 1.0, (rows, 256), &Device::Cpu).unwrap();
            let want = x.matmul(&w.t().unwrap()).unwrap();
            for name in ["bf16", "f16", "f32"] {
                let layer = Linear::load(&weights.pp(name), 256, 512, false).unwrap();
                assert!(
                    matches!(layer.weight, Weight::Mapped(_)),
                    "{name} is mapped"
                );
                let got = layer.forward(&x).unwrap();
                // Both accumulate exact products in f32; only the summation order differs.
                assert!(
                    max_abs_diff(&got, &want).unwrap() < 1e-4,
                    "{name}, {rows} rows"
                );
            }
            let rms = |t: &Tensor| -> f32 {
                t.sqr()
                    .unwrap()
                    .mean_all()
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .to_scalar()
                    .unwrap()
            };
            for (format, tolerance) in [(Quantization::Q8_0, 0.01), (Quantization::Q4K, 0.1)] {
                let layer =
                    Linear::load(&weights.pp("bf16").quantized(Some(format)), 256, 512, false)
                        .unwrap();
                assert!(
                    matches!(layer.weight, Weight::Quantized(_)),
                    "{format:?} is quantized"
                );
                let got = layer.forward(&x).unwrap();
                // Against the product with the weights candle dequantizes: only the activation
                // rounding of the quantized kernel differs.
                let dequantized = layer.weight.to_tensor(DType::F32, &Device::Cpu).unwrap();
                let exact = x.matmul(&dequantized.t().unwrap()).unwrap();
                let err = rms(&(&got - &exact).unwrap()) / rms(&exact);
                assert!(
                    err < 0.01,
                    "{format:?}, {rows} rows: {err} against dequantized"
                );
                // Against the unquantized product: the format's own rounding.
                let err = rms(&(&got - &want).unwrap()) / rms(&want);
                assert!(err < tolerance, "{format:?}, {rows} rows: {err}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A gated MLP's activation in one product on AMX tiles is bit for bit the composed ops
    /// (both layers' outputs, then `silu_mul`): weights read in place (both, or one) and
    /// quantized, with and without biases, on rank-2 and rank-3 prefills.
    #[test]
    fn gated_activation_equals_the_composed_ops() {
        use crate::layers::{gated, gated_batch, silu_mul};
        if !simpleseg_kernels::bf16_gemm::amx() {
            eprintln!("skipped: the fused gated product runs on AMX tiles, which this CPU lacks");
            return;
        }
        let dir = std::env::temp_dir().join(format!("simpleseg-gated-{}", std::process::id()));
        let (_, files) = files(&dir);
        let weights = Weights::from_files(files, DType::BF16, &Device::Cpu);
        let layer = |name: &str, format: Option<Quantization>, bias: bool| {
            let mut layer =
                Linear::load(&weights.pp(name).quantized(format), 256, 512, false).unwrap();
            layer.bias = bias.then(|| random_bf16(512, 1.0));
            layer
        };
        let x = random_bf16((2, 23, 256), 1.0);
        for (gate, up, format) in [
            ("bf16", "other", None),
            ("f16", "other", None),
            ("bf16", "other", Some(Quantization::Q8_0)),
            ("bf16", "other", Some(Quantization::Q4K)),
        ] {
            for bias in [false, true] {
                let (g, u) = (layer(gate, format, bias), layer(up, format, false));
                for x in [x.clone(), x.reshape((46, 256)).unwrap()] {
                    let want = silu_mul(&g.forward(&x).unwrap(), &u.forward(&x).unwrap()).unwrap();
                    let got = gated(&g, &u, &x).unwrap();
                    assert_eq!(got.dims(), want.dims());
                    assert_eq!(bits(&got), bits(&want), "{gate}, {format:?}, bias {bias}");
                    // A batch: fused products among composed ones (a decoding row's, before
                    // and after them), each in its place.
                    let row = x.flatten_to(x.rank() - 2).unwrap().narrow(0, 0, 1).unwrap();
                    let batch =
                        gated_batch(&[(&g, &u, &row), (&g, &u, &x), (&u, &g, &row), (&u, &g, &x)])
                            .unwrap();
                    let composed = |a: &Linear, b: &Linear, x: &Tensor| {
                        silu_mul(&a.forward(x).unwrap(), &b.forward(x).unwrap()).unwrap()
                    };
                    assert_eq!(bits(&batch[0]), bits(&composed(&g, &u, &row)));
                    assert_eq!(bits(&batch[1]), bits(&want));
                    assert_eq!(bits(&batch[2]), bits(&composed(&u, &g, &row)));
                    assert_eq!(bits(&batch[3]), bits(&composed(&u, &g, &x)));
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A linear layer with tanh-GELU applied as its AMX prefill stores its outputs is bit for
    /// bit the composed ops (the layer's output, then `gelu_tanh`): weights read in place and
    /// quantized, with and without a bias.
    #[test]
    fn linear_gelu_tanh_equals_the_composed_ops() {
        use crate::layers::{gelu_tanh, linear_gelu_tanh};
        use simpleseg_kernels::math::Activation;
        if !simpleseg_kernels::bf16_gemm::amx() {
            eprintln!("skipped: the fused activation runs on AMX tiles, which this CPU lacks");
            return;
        }
        let dir = std::env::temp_dir().join(format!("simpleseg-gelu-{}", std::process::id()));
        let (_, files) = files(&dir);
        let weights = Weights::from_files(files, DType::BF16, &Device::Cpu);
        let x = random_bf16((46, 256), 0.2);
        for format in [None, Some(Quantization::Q8_0), Some(Quantization::Q4K)] {
            for bias in [false, true] {
                let mut layer =
                    Linear::load(&weights.pp("bf16").quantized(format), 256, 512, false).unwrap();
                layer.bias = bias.then(|| random_bf16(512, 1.0));
                let want = gelu_tanh(&layer.forward(&x).unwrap()).unwrap();
                let fused = layer
                    .forward_activated(&x, Activation::GeluTanh)
                    .unwrap()
                    .expect("the fused path applies to a BF16 prefill on AMX");
                assert_eq!(bits(&fused), bits(&want), "{format:?}, bias {bias}");
                let got = linear_gelu_tanh(&layer, &x).unwrap();
                assert_eq!(bits(&got), bits(&want), "{format:?}, bias {bias}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A prefill against a dense BF16 weight (a convolution's kernel, a weight copied at load)
    /// runs the GEMM on the tensor's values in place: bit for bit the same layer over the
    /// weight mapped from the file, with and without a bias.
    #[test]
    fn dense_bf16_prefill_equals_the_mapped_layer() {
        if !simpleseg_kernels::bf16_gemm::amx() {
            eprintln!("skipped: the dense path runs on AMX tiles, which this CPU lacks");
            return;
        }
        let dir = std::env::temp_dir().join(format!("simpleseg-dense-{}", std::process::id()));
        let (w, files) = files(&dir);
        let weights = Weights::from_files(files, DType::BF16, &Device::Cpu);
        let x = random_bf16((46, 256), 1.0);
        let bias = random_bf16(512, 1.0);
        for bias in [None, Some(bias)] {
            let mut mapped = Linear::load(&weights.pp("bf16"), 256, 512, false).unwrap();
            assert!(matches!(mapped.weight, Weight::Mapped(_)));
            mapped.bias = bias.clone();
            let dense = Linear::new(w.to_dtype(DType::BF16).unwrap(), bias.clone());
            let want = mapped.forward(&x).unwrap();
            let got = dense.forward(&x).unwrap();
            assert_eq!(bits(&got), bits(&want), "bias {}", bias.is_some());
            if let Some(bias) = &bias {
                // Not candle's product, rounded, then the bias added and rounded again.
                let w = w.to_dtype(DType::BF16).unwrap();
                let candle = x
                    .matmul(&w.t().unwrap())
                    .unwrap()
                    .broadcast_add(bias)
                    .unwrap();
                assert_ne!(bits(&got), bits(&candle), "one rounding, not two");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
