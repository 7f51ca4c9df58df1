//! Host tensors to and from libtorch.

use fusion::state::{DType, HostTensor};
use tch::{Device, Kind, Tensor};

use crate::Result;

/// Conversions between [`HostTensor`] and libtorch tensors.
pub trait TchExt: Sized {
    /// Converts to a libtorch tensor on the CPU (copies).
    fn to_tch(&self) -> Tensor;
    /// Copies a libtorch tensor (any device, float or int64) to the host.
    fn from_tch(t: &Tensor) -> Result<Self>;
}

impl TchExt for HostTensor {
    fn to_tch(&self) -> Tensor {
        let dims: Vec<i64> = self.shape().iter().map(|&d| d as i64).collect();
        let t = match self.dtype() {
            DType::F32 => Tensor::from_slice(self.as_f32().unwrap_or(&[])),
            DType::I64 => Tensor::from_slice(self.as_i64().unwrap_or(&[])),
        };
        t.reshape(&dims)
    }

    fn from_tch(t: &Tensor) -> Result<Self> {
        let shape: Vec<usize> = t.size().iter().map(|&d| d as usize).collect();
        let flat = t
            .f_to_device(Device::Cpu)?
            .f_contiguous()?
            .f_flatten(0, -1)?;
        match t.kind() {
            Kind::Int64 => Ok(HostTensor::i64(shape, Vec::<i64>::try_from(&flat)?)),
            _ => {
                let flat = flat.f_to_kind(Kind::Float)?;
                Ok(HostTensor::f32(shape, Vec::<f32>::try_from(&flat)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tch_round_trip_keeps_values_and_shape() {
        let t = HostTensor::f32(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        let back = HostTensor::from_tch(&t.to_tch()).unwrap();
        assert_eq!(back.shape(), &[2, 3]);
        assert_eq!(back.as_f32().unwrap(), t.as_f32().unwrap());
        let i = HostTensor::i64(vec![], vec![7]);
        let back = HostTensor::from_tch(&i.to_tch()).unwrap();
        assert_eq!(back.as_i64().unwrap(), &[7]);
        assert_eq!(back.shape(), &[] as &[usize]);
    }
}
