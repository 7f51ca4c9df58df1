//! The one job driver: trains or fine-tunes a model ([`run_training`]) or
//! evaluates models and ensembles ([`run_evaluation`]) from a description,
//! reading and writing bytes by key through a [`JobIo`] and reporting
//! through [`JobHooks`]. The worker drives it over the object store,
//! `ntctl train` and `ntctl eval` over local files ([`LocalFiles`]); neither
//! repeats the sequence: load the data, normalise it as the model was
//! trained, build the model and its teachers, resume, train, evaluate,
//! record the lineage, save.

mod eval;
mod joint;
mod local;
mod train;

use std::sync::Arc;

use fusion::arch::Architecture;
use fusion::checkpoint::{self, Loaded, ShardIndex};
use fusion::state::{Backing, StateDict};
use nt_spec::DataSpec;
use tch::Device;

pub use eval::{run_evaluation, EvalJob, Evaluated, Normalize};
pub use joint::{run_joint_training, JointJob};
pub use local::LocalFiles;
pub use train::{epoch_state_key, run_training, Provenance, Start, TrainJob, Trained};

use crate::data::{self, DataCache, FileSource, LoadOptions, Normalization, Prepared, Splits};
use crate::train::Progress;
use crate::{Result, RuntimeError};

/// Where a job's inputs and outputs live, by key: object keys in the
/// worker, file paths offline.
///
/// Errors say what another attempt may expect: a failing store is
/// [`RuntimeError::Storage`] (retryable), a missing object
/// [`RuntimeError::Missing`] (not), a failing file [`RuntimeError::Io`].
pub trait JobIo {
    /// The bytes under `key`; a missing key is an error.
    fn read(&self, key: &str) -> Result<Vec<u8>>;
    /// Stores `bytes` under `key`, replacing what was there; a reader never
    /// sees half an object.
    fn write(&self, key: &str, bytes: Vec<u8>) -> Result<()>;
    /// Where the files of the data set `spec` are read from.
    fn data_source(&self, spec: &DataSpec) -> Result<Box<dyn FileSource + '_>>;
    /// Where decoded image folders are kept (none: decode every time).
    fn data_cache(&self) -> Option<Box<dyn DataCache + '_>> {
        None
    }
    /// The checkpoint under `key`, in f32 whatever precision it is stored in:
    /// a safetensors file, or the index of a sharded one
    /// (`*.safetensors.index.json`) with its shards next to it
    /// ([`read_checkpoint`]).
    fn checkpoint(&self, key: &str) -> Result<Loaded> {
        read_checkpoint(self, key)
    }
}

/// Reads the checkpoint under `key` through `io.read`: one file, or an
/// index and the shards it names, next to it. A missing shard is an error
/// naming the shard and the index; a failing store stays retryable.
pub fn read_checkpoint<T: JobIo + ?Sized>(io: &T, key: &str) -> Result<Loaded> {
    let bytes = io.read(key)?;
    if !checkpoint::is_index(key) {
        return Ok(checkpoint::read_bytes(key, bytes)?);
    }
    let index = ShardIndex::parse(key, &bytes)?;
    let shards = index
        .shards()
        .iter()
        .map(|shard| {
            let shard_key = checkpoint::shard_key(key, shard);
            match io.read(&shard_key) {
                Ok(bytes) => Ok((shard_key, Arc::new(bytes) as Backing)),
                Err(RuntimeError::Missing(_)) => Err(RuntimeError::checkpoint(
                    key,
                    format!("shard `{shard}` listed in the index does not exist (`{shard_key}`)"),
                )),
                Err(e) => Err(e),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(index.assemble(shards)?)
}

/// What a job tells its caller while it runs, and how the caller stops it.
/// Every method has a default that does nothing (and never stops).
pub trait JobHooks {
    /// The data is on the device and the model is ready; training starts next.
    fn started(&mut self, _start: &Started<'_>) {}

    /// Training progress, every `log_every` steps and at each epoch's end.
    fn progress(&mut self, _progress: &Progress) {}

    /// Progress of part `part` of a joint training ([`run_joint_training`]).
    fn part_progress(&mut self, _part: usize, progress: &Progress) {
        self.progress(progress);
    }

    /// Epoch `epoch`'s resumable state is stored under `key`.
    fn epoch_saved(&mut self, _epoch: usize, _key: &str) {}

    /// Storing epoch `epoch`'s state failed. Returning the error ends the
    /// job (the default); returning `Ok` trains on without that state.
    fn epoch_save_failed(&mut self, _epoch: usize, error: RuntimeError) -> Result<()> {
        Err(error)
    }

    /// Whether to stop now. Asked after every progress report and before
    /// each model an evaluation takes; a stopped job ends with
    /// [`RuntimeError::Stopped`].
    fn should_stop(&self) -> bool {
        false
    }
}

/// Hooks that report nothing and never stop.
pub struct Quiet;
impl JobHooks for Quiet {}

/// A training about to start, for [`JobHooks::started`].
pub struct Started<'a> {
    pub arch: &'a Architecture,
    pub data: &'a Prepared,
    pub device: Device,
    /// The epochs a resumed training has already done.
    pub resumed_after: Option<usize>,
}

/// Which architecture a checkpoint is read with.
#[derive(Clone, Debug)]
pub enum ArchOf {
    Given(Architecture),
    /// The one recorded in the checkpoint's metadata.
    Recorded,
}

/// A checkpoint to load.
#[derive(Clone, Debug)]
pub struct ModelRef {
    pub key: String,
    pub arch: ArchOf,
}

/// Reads a checkpoint (f32, bf16 or f16, one file or sharded:
/// [`JobIo::checkpoint`]) and checks it against its architecture.
pub fn load_model(io: &dyn JobIo, model: &ModelRef) -> Result<(Architecture, StateDict)> {
    let state = io.checkpoint(&model.key)?.state;
    let arch = match &model.arch {
        ArchOf::Given(arch) => arch.clone(),
        ArchOf::Recorded => match state.arch() {
            Some(spec) => Architecture::new(
                spec.map_err(|e| RuntimeError::checkpoint(&model.key, e.to_string()))?,
            )?,
            None => {
                return Err(RuntimeError::Spec(format!(
                    "{} records no architecture; give one (a preset or a spec file)",
                    model.key
                )))
            }
        },
    };
    checkpoint::validate(&state, &arch, &model.key)?;
    Ok((arch, state))
}

fn recorded_normalization(state: &StateDict) -> Option<Normalization> {
    state.input().map(|i| Normalization::from(&i))
}

/// Loads the data set, checks that `arch` takes it and puts it on `device`,
/// normalised with `normalization` when given.
fn prepare(
    io: &dyn JobIo,
    spec: &DataSpec,
    arch: &Architecture,
    device: Device,
    normalization: Option<Normalization>,
) -> Result<Prepared> {
    let splits = load_data(io, spec, arch.input_shape())?;
    splits.check_fits(arch)?;
    splits.to_device_with(device, normalization)
}

/// Loads a data set through `io`'s source and cache, for an input of `input_shape`.
fn load_data(io: &dyn JobIo, spec: &DataSpec, input_shape: &[usize]) -> Result<Splits> {
    let source = io.data_source(spec)?;
    let cache = io.data_cache();
    let options = LoadOptions {
        cache: cache.as_deref(),
        ..LoadOptions::new(input_shape)
    };
    data::load_with(spec, source.as_ref(), &options)
}
