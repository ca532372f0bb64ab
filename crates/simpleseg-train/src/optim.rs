//! AdamW with decoupled weight decay, a warmup + cosine learning-rate schedule and global
//! gradient-norm clipping. The moments are plain tensors that checkpoints save and restore,
//! so a resumed run continues exactly where it stopped.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Optimizer settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient norm above which gradients are scaled down; 0 disables.
    pub max_grad_norm: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: 1.0,
        }
    }
}

/// Linear warmup to the peak learning rate, then cosine decay to `min_ratio` of it at `total`.
pub fn lr_at(step: usize, peak: f64, warmup: usize, total: usize, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / span as f64).min(1.0);
    let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
    peak * (min_ratio + (1.0 - min_ratio) * cosine)
}

/// AdamW over named variables.
pub struct AdamW {
    pub config: AdamWConfig,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: usize,
}

/// What one optimizer step did.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct StepInfo {
    pub grad_norm: f64,
    pub lr: f64,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, config: AdamWConfig) -> Result<Self> {
        let zeros = |v: &Var| Tensor::zeros(v.shape(), DType::F32, v.device());
        let m = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = vars
            .iter()
            .map(|(_, v)| zeros(v))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(AdamW {
            config,
            vars,
            m,
            v,
            step: 0,
        })
    }

    /// Clips the gradients to the global norm and applies one update at learning rate `lr`.
    /// Variables without a gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<StepInfo> {
        let mut sq = 0f64;
        let gs: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).cloned())
            .collect();
        for g in gs.iter().flatten() {
            sq += f64::from(g.sqr()?.sum_all()?.to_scalar::<f32>()?);
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            return Err(Error::Invalid(format!(
                "gradient norm is {norm} at step {}: lower the learning rate",
                self.step
            )));
        }
        let c = &self.config;
        let scale = if c.max_grad_norm > 0.0 && norm > c.max_grad_norm {
            c.max_grad_norm / (norm + 1e-6)
        } else {
            1.0
        };
        self.step += 1;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for (i, g) in gs.into_iter().enumerate() {
            let Some(g) = g else { continue };
            let g = (g * scale)?;
            self.m[i] = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            self.v[i] = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let m_hat = (&self.m[i] / bc1)?;
            let v_hat = (&self.v[i] / bc2)?;
            let update = (m_hat / (v_hat.sqrt()? + c.eps)?)?;
            let var = &self.vars[i].1;
            let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(StepInfo {
            grad_norm: norm,
            lr,
        })
    }

    /// The moments, named `m.<var>` and `v.<var>`, for a checkpoint.
    pub fn state(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::with_capacity(2 * self.vars.len());
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("m.{name}"), self.m[i].clone()));
            out.push((format!("v.{name}"), self.v[i].clone()));
        }
        out
    }

    /// Restores the moments saved by [`AdamW::state`].
    pub fn load_state(&mut self, state: &HashMap<String, Tensor>, step: usize) -> Result<()> {
        for (i, (name, _)) in self.vars.iter().enumerate() {
            let get = |k: String| {
                state
                    .get(&k)
                    .cloned()
                    .ok_or_else(|| Error::Invalid(format!("optimizer state lacks {k}")))
            };
            self.m[i] = get(format!("m.{name}"))?;
            self.v[i] = get(format!("v.{name}"))?;
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn schedule_shape() {
        assert!((lr_at(0, 1.0, 10, 100, 0.1) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 1.0, 10, 100, 0.1) - 1.0).abs() < 1e-12);
        assert!((lr_at(100, 1.0, 10, 100, 0.1) - 0.1).abs() < 1e-12);
        assert!(lr_at(55, 1.0, 10, 100, 0.1) < 1.0);
    }

    #[test]
    fn minimizes_a_quadratic() {
        let x = Var::new(&[3.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = AdamW::new(
            vec![("x".into(), x.clone())],
            AdamWConfig {
                lr: 0.1,
                weight_decay: 0.0,
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 0..300 {
            let loss = x.as_tensor().sqr().unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            opt.step(&grads, 0.1).unwrap();
        }
        let v: Vec<f32> = x.as_tensor().to_vec1().unwrap();
        assert!(v.iter().all(|x| x.abs() < 0.05), "{v:?}");
    }
}
