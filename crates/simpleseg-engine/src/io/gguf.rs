//! A streaming GGUF writer: the header first (names, shapes, types and offsets are known
//! before any tensor is quantized), then each tensor's bytes as they are produced, so a
//! checkpoint of any size is written holding one tensor at a time.
//!
//! The format is GGUF version 3 as llama.cpp and candle read it: little-endian, strings as a
//! u64 length and UTF-8 bytes, dimensions innermost first, tensor data aligned to
//! `general.alignment` (32) from the start of the data section.

use std::io::{Seek, Write};

use candle_core::quantized::GgmlDType;

/// Alignment of the data section and of every tensor in it.
pub const ALIGNMENT: u64 = 32;

/// A metadata value.
#[derive(Clone, Debug)]
pub enum MetaValue {
    U32(u32),
    String(String),
}

/// One tensor of the file: its name, shape (outermost first, as in safetensors) and type.
#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

impl TensorInfo {
    /// Bytes of the tensor's data.
    pub fn size(&self) -> usize {
        let elems: usize = self.shape.iter().product();
        elems / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// The type id GGUF files use for `t`.
pub fn type_id(t: GgmlDType) -> u32 {
    match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn write_string<W: Write>(w: &mut W, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn padding(position: u64) -> usize {
    (position.div_ceil(ALIGNMENT) * ALIGNMENT - position) as usize
}

/// Writes a GGUF file: `metadata`, then `tensors` whose bytes `data(i)` returns in order
/// (exactly [`TensorInfo::size`] bytes each, or the write fails).
pub fn write<W, F, E>(
    w: &mut W,
    metadata: &[(&str, MetaValue)],
    tensors: &[TensorInfo],
    mut data: F,
) -> Result<(), E>
where
    W: Write + Seek,
    F: FnMut(usize) -> Result<Vec<u8>, E>,
    E: From<std::io::Error>,
{
    w.write_all(b"GGUF")?;
    w.write_all(&3u32.to_le_bytes())?;
    w.write_all(&(tensors.len() as u64).to_le_bytes())?;
    w.write_all(&(metadata.len() as u64 + 1).to_le_bytes())?;
    write_string(w, "general.alignment")?;
    w.write_all(&4u32.to_le_bytes())?;
    w.write_all(&(ALIGNMENT as u32).to_le_bytes())?;
    for (key, value) in metadata {
        write_string(w, key)?;
        match value {
            MetaValue::U32(v) => {
                w.write_all(&4u32.to_le_bytes())?;
                w.write_all(&v.to_le_bytes())?;
            }
            MetaValue::String(s) => {
                w.write_all(&8u32.to_le_bytes())?;
                write_string(w, s)?;
            }
        }
    }
    let mut offset = 0u64;
    for t in tensors {
        write_string(w, &t.name)?;
        w.write_all(&(t.shape.len() as u32).to_le_bytes())?;
        for &d in t.shape.iter().rev() {
            w.write_all(&(d as u64).to_le_bytes())?;
        }
        w.write_all(&type_id(t.dtype).to_le_bytes())?;
        w.write_all(&offset.to_le_bytes())?;
        offset += t.size() as u64;
        offset += padding(offset) as u64;
    }
    let header_end = w.stream_position()?;
    w.write_all(&vec![0u8; padding(header_end)])?;
    for (i, t) in tensors.iter().enumerate() {
        let bytes = data(i)?;
        if bytes.len() != t.size() {
            return Err(std::io::Error::other(format!(
                "tensor {} has {} bytes, expected {}",
                t.name,
                bytes.len(),
                t.size()
            ))
            .into());
        }
        w.write_all(&bytes)?;
        w.write_all(&vec![0u8; padding(bytes.len() as u64)])?;
    }
    Ok(())
}
