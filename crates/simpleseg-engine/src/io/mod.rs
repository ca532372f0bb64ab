//! Model I/O: Hugging Face folders ([`hf`]), tensors read in place from safetensors and GGUF
//! files ([`weights`], [`quantized`], [`gguf`]), and how a model is loaded ([`load`]).

pub mod gguf;
pub mod hf;
pub mod load;
pub mod quantized;
pub mod weights;
