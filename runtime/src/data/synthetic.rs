//! A seeded synthetic data set: one random prototype image per class, and
//! samples that are noisy copies of their class's prototype. Learnable in a
//! few epochs, identical for a seed, and free of files.

use nt_spec::data::SyntheticSpec;

use super::{ImageSet, SplitMix64};

/// `n` samples of `spec`; prototypes depend on `spec.seed` only, samples on `seed`.
pub fn generate_synthetic(spec: &SyntheticSpec, n: usize, seed: u64) -> ImageSet {
    let len: usize = spec.shape.iter().product();
    let classes = spec.classes.max(1);
    let mut proto_rng = SplitMix64::new(spec.seed);
    let prototypes: Vec<f64> = (0..classes * len).map(|_| proto_rng.next_f64()).collect();
    let mut rng = SplitMix64::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(1));
    let mut images = Vec::with_capacity(n * len);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let class = (rng.next_u64() % classes as u64) as usize;
        labels.push(class as i64);
        for p in &prototypes[class * len..(class + 1) * len] {
            let v = p + spec.noise * (rng.next_f64() - 0.5) * 2.0;
            images.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
        }
    }
    ImageSet {
        images,
        labels,
        shape: spec.shape,
    }
}
