//! Embedding tables, whose rows are gathered on demand: read in place when mapped, so that only
//! the looked-up rows are ever touched.

use candle_core::quantized::QMatMul;
use candle_core::{DType, Result, Tensor};

use crate::io::weights::{Weight, Weights};
use crate::layers::linear::Linear;

/// An embedding table whose rows are gathered on demand, read in place when mapped.
#[derive(Clone, Debug)]
pub struct Embedding {
    table: Weight,
    dtype: DType,
}

impl Embedding {
    /// The table `(vocab, hidden)` under `name`, read in place like a linear weight and never
    /// quantized.
    pub fn load(w: &Weights, vocab: usize, hidden: usize, name: &str) -> Result<Self> {
        let table = w.pp(name).quantized(None).matrix(hidden, vocab)?;
        Ok(Embedding::new(table, w.dtype()))
    }

    /// A table `(vocab, hidden)`; looked-up rows come out in `dtype`.
    pub fn new(table: Weight, dtype: DType) -> Self {
        Embedding { table, dtype }
    }

    /// A table held as a candle tensor.
    pub fn from_tensor(table: Tensor) -> Self {
        let dtype = table.dtype();
        Embedding::new(Weight::Dense(table), dtype)
    }

    /// The table as a linear layer (`hidden -> vocab`): a tied output head.
    pub fn as_linear(&self) -> Linear {
        Linear {
            weight: self.table.clone(),
            bias: None,
        }
    }

    /// Rows of `ids` (any shape): `(..., hidden)`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let flat = ids.flatten_all()?;
        let rows = match &self.table {
            Weight::Dense(t) => t.index_select(&flat, 0)?,
            Weight::Mapped(m) => {
                let ids: Vec<u32> = flat.to_vec1()?;
                let mut out = vec![0f32; ids.len() * m.cols];
                for (o, &id) in out.chunks_mut(m.cols).zip(&ids) {
                    let id = id as usize;
                    if id >= m.rows {
                        candle_core::bail!("token id {id} is outside the {}-row embedding", m.rows);
                    }
                    m.row_into(id, o);
                }
                Tensor::from_vec(out, (ids.len(), m.cols), flat.device())?
            }
            Weight::Quantized(q) => {
                let ids: Vec<u32> = flat.to_vec1()?;
                let mut out = vec![0f32; ids.len() * q.cols];
                for (o, &id) in out.chunks_mut(q.cols.max(1)).zip(&ids) {
                    if id as usize >= q.rows {
                        candle_core::bail!("token id {id} is outside the {}-row embedding", q.rows);
                    }
                    q.row_into(id as usize, o);
                }
                Tensor::from_vec(out, (ids.len(), q.cols), flat.device())?
            }
            Weight::QuantizedDevice(q) => {
                let table = match q.as_ref() {
                    QMatMul::QTensor(t) => t.dequantize(flat.device())?,
                    QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.clone(),
                };
                table.index_select(&flat, 0)?
            }
        };
        let mut dims = ids.dims().to_vec();
        dims.push(rows.dim(1)?);
        rows.to_dtype(self.dtype)?.reshape(dims)
    }
}
