//! A seeded synthetic data set: one random prototype image per class, and
//! samples that are noisy copies of their class's prototype. Learnable in a
//! few epochs, identical for a seed, and free of files.

use nt_spec::data::SyntheticSpec;

use super::{ImageSet, SplitMix64};
use crate::error::{Result, RuntimeError};

/// `n` samples of `spec`; prototypes depend on `spec.seed` only, samples on
/// `seed`. A set too large for this machine's memory is an error, not an
/// abort of the process (the coordinator's `--max-data-bytes` refuses such
/// specs first; this holds for a worker whose memory is smaller).
pub fn generate_synthetic(spec: &SyntheticSpec, n: usize, seed: u64) -> Result<ImageSet> {
    let classes = spec.classes.max(1);
    let too_large = || {
        RuntimeError::Data(format!(
            "a synthetic set of {n} samples of shape {:?} does not fit in this worker's memory",
            spec.shape
        ))
    };
    let len = spec
        .shape
        .iter()
        .try_fold(1usize, |a, &b| a.checked_mul(b))
        .ok_or_else(too_large)?;
    let mut prototypes: Vec<f64> = Vec::new();
    prototypes
        .try_reserve_exact(classes.checked_mul(len).ok_or_else(too_large)?)
        .map_err(|_| too_large())?;
    let mut proto_rng = SplitMix64::new(spec.seed);
    prototypes.extend((0..classes * len).map(|_| proto_rng.next_f64()));
    let mut rng = SplitMix64::new(seed.wrapping_mul(0x2545_F491_4F6C_DD1D).wrapping_add(1));
    let mut images: Vec<u8> = Vec::new();
    images
        .try_reserve_exact(n.checked_mul(len).ok_or_else(too_large)?)
        .map_err(|_| too_large())?;
    let mut labels: Vec<i64> = Vec::new();
    labels.try_reserve_exact(n).map_err(|_| too_large())?;
    for _ in 0..n {
        let class = (rng.next_u64() % classes as u64) as usize;
        labels.push(class as i64);
        for p in &prototypes[class * len..(class + 1) * len] {
            let v = p + spec.noise * (rng.next_f64() - 0.5) * 2.0;
            images.push((v.clamp(0.0, 1.0) * 255.0).round() as u8);
        }
    }
    Ok(ImageSet {
        images,
        labels,
        shape: spec.shape,
    })
}
