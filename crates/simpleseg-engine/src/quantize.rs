//! Writing a quantized model folder: the language model's linear layers quantized into one GGUF
//! file ([`GGUF_FILE`]) beside the unchanged config, tokenizer, template and processor files,
//! so that the folder loads directly and instantly (the GGUF file is memory-mapped).
//!
//! Which tensors are quantized is not a list kept here: the model's own loading code is run
//! against a [`LoadingPlan`], and the linear layers it would quantize at load are the ones
//! quantized in the file. A folder written here therefore computes exactly what
//! `--quantize FORMAT` computes on the original folder.

use std::collections::HashMap;
use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::DType;

use crate::error::{Error, Result};
use crate::io::gguf::{MetaValue, TensorInfo};
use crate::io::hf::HfFolder;
use crate::io::weights::{
    folder_files, LoadingPlan, Quantization, TensorRequest, Weights, GGUF_FILE, SHAPE_KEY,
};

/// The most dimensions a GGUF tensor has.
const MAX_DIMS: usize = 4;

/// What a model folder's loading code asks for when quantizing to `format`, and where the
/// family looks for a separate output head (a tied head reads the embedding table otherwise).
pub fn loading_plan(
    folder: &HfFolder,
    format: Option<Quantization>,
) -> Result<(Vec<TensorRequest>, &'static str)> {
    let files = folder_files(folder)?;
    let plan = LoadingPlan::with_names(files.names().cloned());
    let weights = Weights::plan(&plan, DType::BF16).quantized(format);
    let head = (crate::registry::family(folder)?.plan)(folder, &weights)?;
    Ok((plan.requests(), head))
}

/// What [`quantize_folder`] wrote.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct QuantizeSummary {
    /// Tensors per stored type (`q4k`, `q8_0`, `bf16`, ...).
    pub tensors_by_type: std::collections::BTreeMap<String, usize>,
    /// Bytes of the source weights and of the written GGUF file's tensor data.
    pub source_bytes: u64,
    pub written_bytes: u64,
    /// Files copied unchanged.
    pub copied: Vec<String>,
}

fn type_name(t: GgmlDType) -> String {
    match t {
        GgmlDType::Q8_0 => "q8_0".into(),
        GgmlDType::Q4K => "q4k".into(),
        GgmlDType::Q4_0 => "q4_0".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// A failure while writing the GGUF file: of the file itself, or of reading a tensor.
enum WriteError {
    Io(std::io::Error),
    Model(Error),
}

impl From<std::io::Error> for WriteError {
    fn from(e: std::io::Error) -> Self {
        WriteError::Io(e)
    }
}

impl From<Error> for WriteError {
    fn from(e: Error) -> Self {
        WriteError::Model(e)
    }
}

/// Writes `src` quantized to `format` into the (existing, empty) folder `out`: [`GGUF_FILE`]
/// and a copy of every other file but the safetensors weights and their index.
/// `progress(done, total)` is called with tensor bytes as they are written.
pub fn quantize_folder(
    src: &HfFolder,
    format: Quantization,
    out: &Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<QuantizeSummary> {
    if src.path(GGUF_FILE).is_file() {
        return Err(Error::Input(format!(
            "{} is quantized already ({GGUF_FILE}); quantize the original folder",
            src.dir().display()
        )));
    }
    let files = folder_files(src)?;
    let (requests, head) = loading_plan(src, Some(format))?;
    let mut quantized: HashMap<String, GgmlDType> = requests
        .iter()
        .filter_map(|r| {
            let in_dim = *r.shape.last()?;
            r.linear
                .flatten()?
                .for_row(in_dim)
                .map(|t| (r.name.clone(), t))
        })
        .collect();
    // A table read both as a quantized head and unquantized (embedding rows) is a tied head:
    // the table stays as stored and the head gets its own quantized copy under the name the
    // loader looks for first, so the folder computes what quantizing at load computes.
    let mut tied = None;
    for r in &requests {
        if let Some(&t) = quantized.get(&r.name) {
            if r.linear != Some(Some(format)) {
                tied = Some((r.name.clone(), t));
            }
        }
    }
    if let Some((table, t)) = &tied {
        quantized.remove(table);
        quantized.insert(head.to_string(), *t);
    }
    let mut names: Vec<String> = files.names().cloned().collect();
    if tied.is_some() && !names.iter().any(|n| n == head) {
        names.push(head.to_string());
    }
    names.sort();
    // The tensor a written name is read from (the tied head's copy reads the table).
    let source = |name: &str| -> String {
        match &tied {
            Some((table, _)) if name == head && files.names().all(|n| n != head) => table.clone(),
            _ => name.to_string(),
        }
    };
    let mut infos = Vec::with_capacity(names.len());
    let mut summary = QuantizeSummary::default();
    let mut shapes = Vec::new();
    for name in &names {
        let (mut shape, stored) = files.stored(&source(name))?;
        if shape.len() > MAX_DIMS {
            // GGUF tensors have at most 4 dimensions: the trailing ones are folded together
            // and the true shape is kept in the metadata.
            shapes.push((
                format!("{SHAPE_KEY}{name}"),
                MetaValue::String(format!("{shape:?}")),
            ));
            let tail: usize = shape[MAX_DIMS - 1..].iter().product();
            shape.truncate(MAX_DIMS - 1);
            shape.push(tail);
        }
        let dtype = match quantized.get(name) {
            Some(&t) => t,
            None => stored,
        };
        *summary.tensors_by_type.entry(type_name(dtype)).or_default() += 1;
        let info = TensorInfo {
            name: name.clone(),
            shape,
            dtype,
        };
        summary.written_bytes += info.size() as u64;
        infos.push(info);
    }
    summary.source_bytes = files.data_bytes();
    let config = src.json("config.json")?;
    let mut metadata = vec![
        (
            "general.architecture",
            MetaValue::String(config.str(&["model_type"]).unwrap_or("unknown").into()),
        ),
        (
            "simpleseg.quantization",
            MetaValue::String(format.name().into()),
        ),
        (
            "simpleseg.source",
            MetaValue::String(src.fingerprint()?.to_string()),
        ),
    ];
    metadata.extend(shapes.iter().map(|(k, v)| (k.as_str(), v.clone())));
    let path = out.join(GGUF_FILE);
    let io = |source| Error::Io {
        path: path.clone(),
        source,
    };
    let mut file =
        std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(&path).map_err(io)?);
    let total = summary.written_bytes;
    let mut done = 0u64;
    crate::io::gguf::write(
        &mut file,
        &metadata,
        &infos,
        |i| -> Result<Vec<u8>, WriteError> {
            let info = &infos[i];
            let bytes = if quantized.contains_key(&info.name) {
                let full = files.tensor_f32(&source(&info.name))?;
                crate::io::weights::quantize_rows(&full, info.dtype)
                    .and_then(|q| q.data().map(|d| d.into_owned()))
                    .map_err(Error::from)?
            } else {
                files.raw_bytes(&info.name)?.to_vec()
            };
            done += bytes.len() as u64;
            progress(done, total);
            Ok(bytes)
        },
    )
    .map_err(|e| match e {
        WriteError::Io(source) => io(source),
        WriteError::Model(e) => e,
    })?;
    use std::io::Write;
    file.flush().map_err(io)?;
    file.get_ref().sync_all().map_err(io)?;
    for entry in std::fs::read_dir(src.dir()).map_err(|source| Error::Io {
        path: src.dir().to_path_buf(),
        source,
    })? {
        let entry = entry.map_err(|source| Error::Io {
            path: src.dir().to_path_buf(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let weights = name.ends_with(".safetensors") || name == "model.safetensors.index.json";
        if weights || !entry.file_type().is_ok_and(|t| t.is_file()) {
            continue;
        }
        std::fs::copy(entry.path(), out.join(&name)).map_err(|source| Error::Io {
            path: entry.path(),
            source,
        })?;
        summary.copied.push(name);
    }
    summary.copied.sort();
    Ok(summary)
}
