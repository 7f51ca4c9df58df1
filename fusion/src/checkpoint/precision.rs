//! The float precisions a checkpoint stores its weights in, and the
//! conversions to and from the `f32` the fusion math works in: widening is
//! exact (every bf16 and f16 value is an f32 value), narrowing rounds to
//! nearest, ties to even, as PyTorch's `tensor.to(torch.bfloat16)` and
//! `tensor.half()` do.

use safetensors::tensor::Dtype;
use serde::{Deserialize, Serialize};

use crate::{FusionError, Result};

/// How a checkpoint stores its float tensors. Integer buffers (BatchNorm's
/// `num_batches_tracked`) are `I64` whatever the precision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// IEEE single precision, as nt trains.
    #[default]
    F32,
    /// bfloat16: f32's exponent, 8 bits of significand.
    BF16,
    /// IEEE half precision.
    F16,
}

impl Precision {
    pub const ALL: [Precision; 3] = [Precision::F32, Precision::BF16, Precision::F16];

    /// `f32`, `bf16` or `f16`, as `--dtype` takes it.
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::BF16 => "bf16",
            Precision::F16 => "f16",
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Precision::F32 => 4,
            Precision::BF16 | Precision::F16 => 2,
        }
    }

    pub(crate) fn dtype(self) -> Dtype {
        match self {
            Precision::F32 => Dtype::F32,
            Precision::BF16 => Dtype::BF16,
            Precision::F16 => Dtype::F16,
        }
    }

    /// The precision of a safetensors float dtype nt reads, if it is one.
    pub(crate) fn of(dtype: Dtype) -> Option<Precision> {
        match dtype {
            Dtype::F32 => Some(Precision::F32),
            Dtype::BF16 => Some(Precision::BF16),
            Dtype::F16 => Some(Precision::F16),
            _ => None,
        }
    }

    /// Little-endian stored values widened to f32, exactly.
    pub(crate) fn widen(self, bytes: &[u8]) -> Vec<f32> {
        match self {
            Precision::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Precision::BF16 => halves(bytes).map(bf16_to_f32).collect(),
            Precision::F16 => halves(bytes).map(f16_to_f32).collect(),
        }
    }

    /// f32 values rounded to this precision, as little-endian bytes.
    pub(crate) fn narrow(self, values: &[f32]) -> Vec<u8> {
        let round: fn(f32) -> u16 = match self {
            Precision::F32 => return bytemuck::cast_slice(values).to_vec(),
            Precision::BF16 => f32_to_bf16,
            Precision::F16 => f32_to_f16,
        };
        let mut out = Vec::with_capacity(values.len() * 2);
        for &v in values {
            out.extend_from_slice(&round(v).to_le_bytes());
        }
        out
    }
}

fn halves(bytes: &[u8]) -> impl Iterator<Item = u16> + '_ {
    bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Precision {
    type Err = FusionError;

    /// `f32`, `bf16` or `f16`, and PyTorch's names for them (`float32`,
    /// `bfloat16`, `float16`, `half`), in any case.
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" | "float" => Ok(Precision::F32),
            "bf16" | "bfloat16" => Ok(Precision::BF16),
            "f16" | "fp16" | "float16" | "half" => Ok(Precision::F16),
            _ => Err(FusionError::Unsupported(crate::error::bounded(format!(
                "dtype `{s}`: checkpoints are f32, bf16 or f16"
            )))),
        }
    }
}

/// A bfloat16 value as f32 (exact).
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// An f32 rounded to bfloat16, to nearest with ties to even; NaN stays NaN
/// (quiet), infinities and overflow are infinite. PyTorch's own rounding.
pub fn f32_to_bf16(value: f32) -> u16 {
    if value.is_nan() {
        return 0x7fc0 | ((value.to_bits() >> 16) as u16 & 0x8000);
    }
    let bits = value.to_bits();
    let bias = 0x7fff + ((bits >> 16) & 1);
    // No overflow: the largest finite f32 rounds up to infinity's bits.
    ((bits + bias) >> 16) as u16
}

/// An IEEE half-precision value as f32 (exact).
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = u32::from(bits & 0x8000) << 16;
    let exponent = u32::from((bits >> 10) & 0x1f);
    let mantissa = u32::from(bits & 0x3ff);
    match exponent {
        0 => {
            // Zero or subnormal: mantissa * 2^-24, exact in f32.
            let magnitude = mantissa as f32 * (1.0 / 16_777_216.0);
            if sign != 0 {
                -magnitude
            } else {
                magnitude
            }
        }
        0x1f => f32::from_bits(sign | 0x7f80_0000 | (mantissa << 13)),
        _ => f32::from_bits(sign | ((exponent + 112) << 23) | (mantissa << 13)),
    }
}

/// An f32 rounded to IEEE half precision, to nearest with ties to even,
/// through the subnormals; overflow is infinite and NaN stays NaN (quiet).
pub fn f32_to_f16(value: f32) -> u16 {
    let bits = value.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exponent = ((bits >> 23) & 0xff) as i32;
    let mantissa = bits & 0x7f_ffff;
    if exponent == 0xff {
        let nan = if mantissa != 0 {
            0x200 | (mantissa >> 13) as u16
        } else {
            0
        };
        return sign | 0x7c00 | nan;
    }
    // The exponent with half precision's bias.
    let e = exponent - 127 + 15;
    if e >= 0x1f {
        return sign | 0x7c00;
    }
    if e <= 0 {
        // A subnormal half (or zero): the significand with its implicit bit,
        // shifted right by 14 - e (14..=24); below that it rounds to zero.
        if e < -10 {
            return sign;
        }
        let significand = mantissa | 0x80_0000;
        let shift = (14 - e) as u32;
        let kept = significand >> shift;
        let rest = significand & ((1 << shift) - 1);
        let halfway = 1 << (shift - 1);
        let up = rest > halfway || (rest == halfway && kept & 1 == 1);
        // A carry into bit 10 makes the smallest normal, as it should.
        return sign | (kept + u32::from(up)) as u16;
    }
    let kept = ((e as u32) << 10) | (mantissa >> 13);
    let rest = mantissa & 0x1fff;
    let up = rest > 0x1000 || (rest == 0x1000 && kept & 1 == 1);
    // A carry out of the mantissa raises the exponent; past the largest
    // finite half it gives infinity's bits.
    sign | (kept + u32::from(up)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_rounds_to_nearest_even() {
        assert_eq!(f32_to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties to even (down).
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8)), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: up to even.
        assert_eq!(f32_to_bf16(1.0 + 3.0 * 2f32.powi(-8)), 0x3f82);
        assert_eq!(f32_to_bf16(1.0 + 2f32.powi(-8) + 2f32.powi(-20)), 0x3f81);
        assert_eq!(f32_to_bf16(-2.0), 0xc000);
        assert_eq!(f32_to_bf16(f32::MAX), 0x7f80);
        assert_eq!(f32_to_bf16(f32::INFINITY), 0x7f80);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
        assert_eq!(f32_to_bf16(-0.0), 0x8000);
        for bits in 0..=u16::MAX {
            let v = bf16_to_f32(bits);
            if !v.is_nan() {
                assert_eq!(f32_to_bf16(v), bits, "{bits:#06x}");
            }
        }
    }

    #[test]
    fn f16_round_trips_every_value_and_rounds_to_nearest_even() {
        for bits in 0..=u16::MAX {
            let v = f16_to_f32(bits);
            if v.is_nan() {
                assert!(f16_to_f32(f32_to_f16(v)).is_nan(), "{bits:#06x}");
            } else {
                assert_eq!(f32_to_f16(v), bits, "{bits:#06x}");
            }
        }
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
        // Ties to even between 1 and the next half (1 + 2^-10).
        assert_eq!(f32_to_f16(1.0 + 2f32.powi(-11)), 0x3c00);
        assert_eq!(f32_to_f16(1.0 + 3.0 * 2f32.powi(-11)), 0x3c02);
        // Overflow: 65520 is halfway to 2^16 and rounds up to infinity.
        assert_eq!(f32_to_f16(65519.0), 0x7bff);
        assert_eq!(f32_to_f16(65520.0), 0x7c00);
        assert_eq!(f32_to_f16(-1e9), 0xfc00);
        // Subnormals: half the smallest is a tie to 0, a bit more is 1.
        assert_eq!(f32_to_f16(2f32.powi(-25)), 0x0000);
        assert_eq!(f32_to_f16(2f32.powi(-25) * 1.0001), 0x0001);
        assert_eq!(f32_to_f16(3.0 * 2f32.powi(-25)), 0x0002);
        assert_eq!(f32_to_f16(-2f32.powi(-26)), 0x8000);
        assert_eq!(f32_to_f16(f32::MIN_POSITIVE), 0x0000);
        // The largest subnormal rounds up into the smallest normal.
        assert_eq!(f32_to_f16(2f32.powi(-14) * (1.0 - 2f32.powi(-12))), 0x0400);
    }

    #[test]
    fn names_parse_in_any_case() {
        for p in Precision::ALL {
            assert_eq!(p.name().parse::<Precision>().unwrap(), p);
        }
        assert_eq!("BFloat16".parse::<Precision>().unwrap(), Precision::BF16);
        assert_eq!("half".parse::<Precision>().unwrap(), Precision::F16);
        let err = "f64".parse::<Precision>().unwrap_err().to_string();
        assert!(err.contains("`f64`") && err.contains("bf16"), "{err}");
    }

    #[test]
    fn widening_and_narrowing_are_inverse_on_representable_values() {
        let values = [0.0f32, -1.5, 3.25, 1024.0, -0.0078125];
        for p in Precision::ALL {
            let bytes = p.narrow(&values);
            assert_eq!(bytes.len(), values.len() * p.size());
            assert_eq!(p.widen(&bytes), values, "{p}");
        }
    }
}
