//! A seeded synthetic data set: one random prototype image per class, and
//! samples that are noisy copies of their class's prototype. Learnable in a
//! few epochs, identical for a seed, and free of files.

use serde::{Deserialize, Serialize};

use super::{ImageSet, SplitMix64};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SyntheticSpec {
    /// Training samples.
    pub train: usize,
    /// Test samples.
    pub test: usize,
    pub classes: usize,
    /// `[channels, height, width]`
    pub shape: [usize; 3],
    pub seed: u64,
    /// Noise amplitude relative to the pixel range (0 = exact prototypes).
    pub noise: f64,
}

impl Default for SyntheticSpec {
    fn default() -> Self {
        SyntheticSpec {
            train: 2048,
            test: 512,
            classes: 10,
            shape: [1, 28, 28],
            seed: 0,
            noise: 0.6,
        }
    }
}

impl SyntheticSpec {
    /// Parses `key=value,...` (keys: train, test, classes, shape, seed, noise).
    pub fn parse(text: &str) -> crate::Result<Self> {
        let mut spec = SyntheticSpec::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad =
                || crate::FusionError::Data(format!("synthetic data option `{part}` is not valid"));
            let (key, value) = part.split_once('=').ok_or_else(bad)?;
            match key {
                "train" => spec.train = value.parse().map_err(|_| bad())?,
                "test" => spec.test = value.parse().map_err(|_| bad())?,
                "classes" => spec.classes = value.parse().map_err(|_| bad())?,
                "seed" => spec.seed = value.parse().map_err(|_| bad())?,
                "noise" => spec.noise = value.parse().map_err(|_| bad())?,
                "shape" => {
                    let dims: Vec<usize> = value
                        .split('x')
                        .map(|d| d.parse().map_err(|_| bad()))
                        .collect::<crate::Result<_>>()?;
                    spec.shape = dims.try_into().map_err(|_| bad())?;
                }
                _ => return Err(bad()),
            }
        }
        Ok(spec)
    }

    /// `n` samples; prototypes depend on `self.seed` only, samples on `seed`.
    pub fn generate(&self, n: usize, seed: u64) -> ImageSet {
        let len: usize = self.shape.iter().product();
        let classes = self.classes.max(1);
        let mut proto_rng = SplitMix64::new(self.seed);
        let prototypes: Vec<f64> = (0..classes * len).map(|_| proto_rng.next_f64()).collect();
        let mut rng = SplitMix64::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(1));
        let mut images = Vec::with_capacity(n * len);
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            let class = (rng.next_u64() % classes as u64) as usize;
            labels.push(class as i64);
            for p in &prototypes[class * len..(class + 1) * len] {
                let v = p + self.noise * (rng.next_f64() - 0.5) * 2.0;
                images.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
            }
        }
        ImageSet {
            images,
            labels,
            shape: self.shape,
        }
    }
}
