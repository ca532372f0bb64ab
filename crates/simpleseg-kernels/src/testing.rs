//! Reproducible values for the kernels' tests and benchmarks (and the engine's).

/// A fixed linear congruential generator, so failures reproduce, with a spread of magnitudes.
pub struct Values(pub u64);

impl Values {
    /// The next `n` values, in about `[-5, 5]`.
    pub fn take(&mut self, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                self.0 = self
                    .0
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let unit = (self.0 >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                unit * (1.0 + (i % 97) as f32 / 10.0)
            })
            .collect()
    }
}
