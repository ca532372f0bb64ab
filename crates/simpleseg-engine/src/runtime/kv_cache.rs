//! What a decoder keeps of the positions it has processed: two tensors per layer, laid out
//! `(batch, heads, positions, dim)` and grown along the positions. Qwen2.5-VL keeps keys and
//! values; Kimi-VL's multi-head latent attention keeps the compressed latent and the shared
//! rotary key, which is what makes its cache small.

use candle_core::{Result, Tensor};

/// The cached tensors of every layer for one group of sequences of equal length.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// One slot per layer, created empty the first time.
    pub fn slots(&mut self, layers: usize) -> &mut [Option<(Tensor, Tensor)>] {
        if self.layers.len() != layers {
            self.layers = vec![None; layers];
        }
        &mut self.layers
    }

    /// The cache repeated `n` times along the batch (a batch-1 prompt shared by `n` samples).
    pub fn repeat_batch(&self, n: usize) -> Result<KvCache> {
        self.map(|t| t.repeat((n, 1, 1, 1)))
    }

    /// The cache of the given batch rows only, in that order.
    pub fn select_rows(&self, rows: &Tensor) -> Result<KvCache> {
        self.map(|t| t.index_select(rows, 0))
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<KvCache> {
        let layers = self
            .layers
            .iter()
            .map(|l| l.as_ref().map(|(a, b)| Ok((f(a)?, f(b)?))).transpose())
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCache { layers })
    }
}

/// Appends new positions `(a, b)` to a layer's slot and returns everything cached there.
pub fn append(
    slot: &mut Option<(Tensor, Tensor)>,
    a: Tensor,
    b: Tensor,
) -> Result<(Tensor, Tensor)> {
    let (a, b) = match slot.take() {
        Some((pa, pb)) => (
            Tensor::cat(&[&pa, &a.contiguous()?], 2)?,
            Tensor::cat(&[&pb, &b.contiguous()?], 2)?,
        ),
        None => (a.contiguous()?, b.contiguous()?),
    };
    *slot = Some((a.clone(), b.clone()));
    Ok((a, b))
}
