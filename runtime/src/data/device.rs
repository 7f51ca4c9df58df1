//! A data set living on the training device: the whole set is uploaded once,
//! normalised, and batches are gathered by index, so loading never starves a
//! GPU. Augmentation (random crop with padding, horizontal flip) runs on the
//! device too, per batch.

use fusion::checkpoint::InputSpec;
use nt_spec::data::Augment;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use super::ImageSet;
use crate::Result;

/// Per-channel normalisation constants.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: Vec<f64>,
    pub std: Vec<f64>,
}

impl From<&InputSpec> for Normalization {
    /// The normalisation a model recorded in its checkpoint.
    fn from(input: &InputSpec) -> Self {
        Normalization {
            mean: input.mean.clone(),
            std: input.std.clone(),
        }
    }
}

impl Normalization {
    /// Mean and standard deviation per channel of a set's pixels in [0, 1].
    pub fn of(set: &ImageSet) -> Self {
        let [c, h, w] = set.shape;
        let plane = h * w;
        let mut sum = vec![0.0f64; c];
        let mut sq = vec![0.0f64; c];
        for img in set.images.chunks_exact(c * plane) {
            for ch in 0..c {
                for &p in &img[ch * plane..(ch + 1) * plane] {
                    let v = f64::from(p) / 255.0;
                    sum[ch] += v;
                    sq[ch] += v * v;
                }
            }
        }
        let n = (set.len() * plane).max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(q, m)| (q / n - m * m).max(1e-12).sqrt())
            .collect();
        Normalization { mean, std }
    }
}

/// A normalised data set on a device.
pub struct DeviceSet {
    /// `[n, c, h, w]` float, normalised.
    pub x: Tensor,
    /// `[n]` int64 labels.
    pub y: Tensor,
    pub len: usize,
    /// `[1, c, 1, 1]`: what a zero pixel becomes after normalisation (the crop's padding).
    pad_value: Tensor,
}

impl DeviceSet {
    pub fn new(set: &ImageSet, norm: &Normalization, device: Device) -> Result<Self> {
        let [c, h, w] = set.shape;
        let n = set.len() as i64;
        let dims = [n, c as i64, h as i64, w as i64];
        let mean = Tensor::from_slice(&norm.mean.iter().map(|&v| v as f32).collect::<Vec<_>>())
            .f_reshape([1, c as i64, 1, 1])?
            .f_to_device(device)?;
        let std = Tensor::from_slice(&norm.std.iter().map(|&v| v as f32).collect::<Vec<_>>())
            .f_reshape([1, c as i64, 1, 1])?
            .f_to_device(device)?;
        // Upload bytes (4x less traffic than floats), convert on the device.
        let x = Tensor::from_slice(&set.images)
            .f_reshape(dims)?
            .f_to_device(device)?
            .f_to_kind(Kind::Float)?
            .f_div_scalar(255.0)?
            .f_sub(&mean)?
            .f_div(&std)?;
        let y = Tensor::from_slice(&set.labels).f_to_device(device)?;
        let pad_value = mean.f_neg()?.f_div(&std)?;
        Ok(DeviceSet {
            x,
            y,
            len: set.len(),
            pad_value,
        })
    }

    pub fn device(&self) -> Device {
        self.x.device()
    }

    /// Batches in order, or in the order of `permutation` (a device int64 tensor).
    pub fn batches(&self, batch_size: usize, permutation: Option<&Tensor>) -> Batches<'_> {
        Batches {
            set: self,
            permutation: permutation.map(Tensor::shallow_clone),
            batch_size: batch_size.max(1),
            next: 0,
        }
    }

    /// Augments a batch with its draws (see [`AugmentDraws`]).
    pub fn augment(&self, x: &Tensor, augment: &Augment, draws: &AugmentDraws) -> Result<Tensor> {
        let mut x = x.shallow_clone();
        let size = x.size();
        let (b, c, h, w) = (size[0], size[1], size[2], size[3]);
        let device = x.device();
        if augment.crop_padding > 0 {
            let p = augment.crop_padding as i64;
            let padded = x
                .f_sub(&self.pad_value)?
                .f_constant_pad_nd([p, p, p, p])?
                .f_add(&self.pad_value)?;
            let rows = draws
                .oy
                .f_unsqueeze(1)?
                .f_add(&Tensor::f_arange(h, (Kind::Int64, device))?.f_unsqueeze(0)?)?
                .f_view([b, 1, h, 1])?
                .f_expand([b, c, h, w + 2 * p], false)?;
            let cols = draws
                .ox
                .f_unsqueeze(1)?
                .f_add(&Tensor::f_arange(w, (Kind::Int64, device))?.f_unsqueeze(0)?)?
                .f_view([b, 1, 1, w])?
                .f_expand([b, c, h, w], false)?;
            x = padded
                .f_gather(2, &rows, false)?
                .f_gather(3, &cols, false)?;
        }
        if augment.hflip {
            let flip = draws.flip.f_view([b, 1, 1, 1])?;
            x = x.f_flip([3])?.f_where_self(&flip, &x)?;
        }
        Ok(x)
    }
}

/// The random choices of augmentation for a run of samples: crop offsets
/// and flips, drawn on the host from a seed (so they do not depend on
/// libtorch's global generator, which concurrent trainings share) and
/// uploaded once per epoch.
pub struct AugmentDraws {
    /// `[n]` int64: vertical crop offset in `0..=2*padding`.
    pub oy: Tensor,
    /// `[n]` int64: horizontal crop offset.
    pub ox: Tensor,
    /// `[n]` bool: flip left to right.
    pub flip: Tensor,
}

impl AugmentDraws {
    pub fn new(n: usize, augment: &Augment, seed: u64, device: Device) -> Result<Self> {
        let mut rng = super::SplitMix64::new(seed);
        let span = 2 * augment.crop_padding as u64 + 1;
        let mut oy = Vec::with_capacity(n);
        let mut ox = Vec::with_capacity(n);
        let mut flip = Vec::with_capacity(n);
        for _ in 0..n {
            oy.push((rng.next_u64() % span) as i64);
            ox.push((rng.next_u64() % span) as i64);
            flip.push(augment.hflip && rng.next_u64() & 1 == 1);
        }
        Ok(AugmentDraws {
            oy: Tensor::from_slice(&oy).f_to_device(device)?,
            ox: Tensor::from_slice(&ox).f_to_device(device)?,
            flip: Tensor::from_slice(&flip).f_to_device(device)?,
        })
    }

    /// The draws of samples `start..start + n`.
    pub fn slice(&self, start: i64, n: i64) -> Result<AugmentDraws> {
        Ok(AugmentDraws {
            oy: self.oy.f_narrow(0, start, n)?,
            ox: self.ox.f_narrow(0, start, n)?,
            flip: self.flip.f_narrow(0, start, n)?,
        })
    }
}

/// Batches of a [`DeviceSet`]: `(images, labels)`.
pub struct Batches<'a> {
    set: &'a DeviceSet,
    permutation: Option<Tensor>,
    batch_size: usize,
    next: usize,
}

impl Batches<'_> {
    pub fn len(&self) -> usize {
        self.set.len.div_ceil(self.batch_size)
    }

    pub fn is_empty(&self) -> bool {
        self.set.len == 0
    }
}

impl Iterator for Batches<'_> {
    type Item = Result<(Tensor, Tensor)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next >= self.set.len {
            return None;
        }
        let start = self.next as i64;
        let n = (self.set.len - self.next).min(self.batch_size) as i64;
        self.next += n as usize;
        let batch = || -> Result<(Tensor, Tensor)> {
            Ok(match &self.permutation {
                None => (
                    self.set.x.f_narrow(0, start, n)?,
                    self.set.y.f_narrow(0, start, n)?,
                ),
                Some(p) => {
                    let idx = p.f_narrow(0, start, n)?;
                    (
                        self.set.x.f_index_select(0, &idx)?,
                        self.set.y.f_index_select(0, &idx)?,
                    )
                }
            })
        };
        Some(batch())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set() -> ImageSet {
        ImageSet {
            images: (0..2 * 2 * 3 * 3).map(|i| (i * 7 % 256) as u8).collect(),
            labels: vec![0, 1],
            shape: [2, 3, 3],
        }
    }

    #[test]
    fn normalised_set_has_zero_mean_and_batches_cover_it() {
        let s = set();
        let d = DeviceSet::new(&s, &Normalization::of(&s), Device::Cpu).unwrap();
        let mean = d.x.mean_dim([0i64, 2, 3].as_slice(), false, Kind::Float);
        assert!(mean.abs().max().double_value(&[]) < 1e-5);
        let perm = Tensor::from_slice(&[1i64, 0]);
        let labels: Vec<i64> = d
            .batches(1, Some(&perm))
            .map(|b| b.unwrap().1.int64_value(&[0]))
            .collect();
        assert_eq!(labels, [1, 0]);
    }

    #[test]
    fn crop_and_flip_keep_shapes_and_pad_with_zero_pixels() {
        let s = set();
        let d = DeviceSet::new(&s, &Normalization::of(&s), Device::Cpu).unwrap();
        let aug = Augment {
            crop_padding: 2,
            hflip: true,
        };
        for seed in 0..20 {
            let draws = AugmentDraws::new(2, &aug, seed, Device::Cpu).unwrap();
            let out = d.augment(&d.x, &aug, &draws).unwrap();
            assert_eq!(out.size(), d.x.size());
            // Every value is either a pixel of the image or the padding value.
            let pad = d.pad_value.view([1, 2, 1, 1]).expand_as(&out);
            let is_pad = out.isclose(&pad, 1e-5, 1e-6, false);
            let min_real = d.x.min().double_value(&[]);
            let ok = is_pad.logical_or(&out.ge(min_real - 1e-5));
            assert!(ok.all().int64_value(&[]) == 1);
        }
        // Padding 0 and no flip: identity.
        let off = Augment::default();
        let draws = AugmentDraws::new(2, &off, 1, Device::Cpu).unwrap();
        let same = d.augment(&d.x, &off, &draws).unwrap();
        assert!(same.equal(&d.x));
    }
}
