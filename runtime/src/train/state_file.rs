//! The resumable training state as a file: weights, momentum buffers,
//! epoch and history in one safetensors file.

use fusion::checkpoint::{load_bytes, to_bytes};
use fusion::state::StateDict;
use serde::{Deserialize, Serialize};

use crate::{Result, RuntimeError};

/// Metadata key of a training state's epoch and history.
pub const META_TRAIN_STATE: &str = "nt.train_state";

#[derive(Serialize, Deserialize)]
struct TrainMeta {
    epoch: usize,
    history: Vec<super::EpochRecord>,
}

/// Serializes a training state (weights, momentum buffers, epoch, history)
/// as one safetensors file: tensors `model/<name>` and `momentum/<name>`.
pub fn train_state_to_bytes(state: &super::TrainState) -> Result<Vec<u8>> {
    let mut out = StateDict::default();
    for (name, t) in &state.model.tensors {
        out.insert(format!("model/{name}"), t.clone());
    }
    for (name, t) in &state.momentum.tensors {
        out.insert(format!("momentum/{name}"), t.clone());
    }
    out.metadata = state.model.metadata.clone();
    let meta = TrainMeta {
        epoch: state.epoch,
        history: state.history.clone(),
    };
    out.metadata.insert(
        META_TRAIN_STATE.into(),
        serde_json::to_string(&meta)
            .map_err(|e| RuntimeError::checkpoint("training state", e.to_string()))?,
    );
    Ok(to_bytes(&out)?)
}

/// Reads a training state written by [`train_state_to_bytes`].
pub fn train_state_from_bytes(source_name: &str, bytes: Vec<u8>) -> Result<super::TrainState> {
    let raw = load_bytes(source_name, bytes)?;
    let meta: TrainMeta = raw
        .metadata
        .get(META_TRAIN_STATE)
        .ok_or_else(|| {
            RuntimeError::checkpoint(
                source_name,
                "not a training state (no nt.train_state metadata)",
            )
        })
        .and_then(|t| {
            serde_json::from_str(t).map_err(|e| {
                RuntimeError::checkpoint(source_name, format!("bad nt.train_state: {e}"))
            })
        })?;
    let mut model = StateDict::default();
    let mut momentum = StateDict::default();
    for (name, t) in raw.tensors {
        if let Some(n) = name.strip_prefix("model/") {
            model.insert(n, t);
        } else if let Some(n) = name.strip_prefix("momentum/") {
            momentum.insert(n, t);
        } else {
            return Err(RuntimeError::checkpoint(
                source_name,
                format!("unexpected tensor `{name}` in a training state"),
            ));
        }
    }
    model.metadata = raw.metadata;
    model.metadata.remove(META_TRAIN_STATE);
    Ok(super::TrainState {
        epoch: meta.epoch,
        model,
        momentum,
        history: meta.history,
    })
}
