//! Host-side tensors and state dicts: what checkpoints hold and what the fusion
//! methods read and write. Float data is either owned or borrowed from a
//! memory-mapped checkpoint, so fusing large members copies nothing on load.

use std::collections::BTreeMap;
use std::sync::Arc;

/// Bytes a checkpoint's tensors can borrow from: a memory map or a downloaded buffer.
pub type Backing = Arc<dyn AsRef<[u8]> + Send + Sync>;

/// Element types a checkpoint may hold: float weights and the integer
/// `num_batches_tracked` counters of BatchNorm layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DType {
    F32,
    I64,
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F32 => "F32",
            DType::I64 => "I64",
        })
    }
}

/// Float storage: owned, or a window into a memory-mapped file.
#[derive(Clone)]
enum F32Data {
    Owned(Arc<Vec<f32>>),
    Mapped {
        map: Backing,
        offset: usize,
        len: usize,
    },
}

#[derive(Clone)]
enum Data {
    F32(F32Data),
    I64(Vec<i64>),
}

/// A dense, row-major tensor on the host.
#[derive(Clone)]
pub struct HostTensor {
    shape: Vec<usize>,
    data: Data,
}

impl std::fmt::Debug for HostTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HostTensor({} {:?})", self.dtype(), self.shape)
    }
}

impl HostTensor {
    /// A float tensor; `data.len()` must equal the product of `shape`.
    pub fn f32(shape: Vec<usize>, data: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "HostTensor::f32: data length does not match shape {shape:?}"
        );
        HostTensor {
            shape,
            data: Data::F32(F32Data::Owned(Arc::new(data))),
        }
    }

    /// An integer tensor; `data.len()` must equal the product of `shape`.
    pub fn i64(shape: Vec<usize>, data: Vec<i64>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            data.len(),
            "HostTensor::i64: data length does not match shape {shape:?}"
        );
        HostTensor {
            shape,
            data: Data::I64(data),
        }
    }

    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self::f32(shape, vec![0.0; n])
    }

    /// A float tensor borrowing `len` floats at byte `offset` of `map`.
    /// Returns `None` when the window is misaligned or out of bounds.
    pub(crate) fn mapped(shape: Vec<usize>, map: Backing, offset: usize) -> Option<Self> {
        let len: usize = shape.iter().product();
        let bytes = (*map)
            .as_ref()
            .get(offset..offset.checked_add(len.checked_mul(4)?)?)?;
        bytemuck::try_cast_slice::<u8, f32>(bytes).ok()?;
        Some(HostTensor {
            shape,
            data: Data::F32(F32Data::Mapped { map, offset, len }),
        })
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn dtype(&self) -> DType {
        match self.data {
            Data::F32(_) => DType::F32,
            Data::I64(_) => DType::I64,
        }
    }

    /// The float data, or `None` for an integer tensor.
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(F32Data::Owned(v)) => Some(v.as_slice()),
            Data::F32(F32Data::Mapped { map, offset, len }) => {
                // Alignment and bounds were checked in `mapped`.
                bytemuck::try_cast_slice(&(**map).as_ref()[*offset..*offset + len * 4]).ok()
            }
            Data::I64(_) => None,
        }
    }

    /// The integer data, or `None` for a float tensor.
    pub fn as_i64(&self) -> Option<&[i64]> {
        match &self.data {
            Data::I64(v) => Some(v),
            Data::F32(_) => None,
        }
    }

    /// The raw little-endian bytes, as safetensors stores them.
    pub fn bytes(&self) -> &[u8] {
        match &self.data {
            Data::F32(F32Data::Owned(v)) => bytemuck::cast_slice(v.as_slice()),
            Data::F32(F32Data::Mapped { map, offset, len }) => {
                &(**map).as_ref()[*offset..*offset + len * 4]
            }
            Data::I64(v) => bytemuck::cast_slice(v),
        }
    }
}

/// Named tensors in PyTorch `state_dict` order-independent form, plus the
/// string metadata a safetensors file carries.
#[derive(Clone, Debug, Default)]
pub struct StateDict {
    pub tensors: BTreeMap<String, HostTensor>,
    pub metadata: BTreeMap<String, String>,
}

impl StateDict {
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    pub fn insert(&mut self, name: impl Into<String>, tensor: HostTensor) {
        self.tensors.insert(name.into(), tensor);
    }

    /// Total number of elements over all float tensors.
    pub fn float_numel(&self) -> usize {
        self.tensors
            .values()
            .filter(|t| t.dtype() == DType::F32)
            .map(HostTensor::numel)
            .sum()
    }
}
