//! Whether a forward pass must carry gradients.

/// Whether a forward pass must carry gradients.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Fused kernels where candle has them.
    #[default]
    Infer,
    /// Only differentiable primitives.
    Train,
}
