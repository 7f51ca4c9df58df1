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

/// Metadata key of a joint training state: the number of members.
pub const META_JOINT_STATE: &str = "nt.joint_state";

/// Serializes the states of a joint training's members (one epoch) as one
/// safetensors file: member k's tensors under `member-<k>/`, its epoch and
/// history in `nt.train_state.<k>`. One object, so a reader never sees
/// members at different epochs.
pub fn joint_state_to_bytes(states: &[super::TrainState]) -> Result<Vec<u8>> {
    let mut out = StateDict::default();
    for (k, state) in states.iter().enumerate() {
        let own = load_bytes("joint member", train_state_to_bytes(state)?)?;
        for (name, t) in own.tensors {
            out.insert(format!("member-{k}/{name}"), t);
        }
        if let Some(meta) = own.metadata.get(META_TRAIN_STATE) {
            out.metadata
                .insert(format!("{META_TRAIN_STATE}.{k}"), meta.clone());
        }
        if k == 0 {
            for (key, value) in own.metadata {
                if key != META_TRAIN_STATE {
                    out.metadata.insert(key, value);
                }
            }
        }
    }
    out.metadata
        .insert(META_JOINT_STATE.into(), states.len().to_string());
    Ok(to_bytes(&out)?)
}

/// Reads a joint state written by [`joint_state_to_bytes`]: one state per member.
pub fn joint_state_from_bytes(source_name: &str, bytes: Vec<u8>) -> Result<Vec<super::TrainState>> {
    let raw = load_bytes(source_name, bytes)?;
    let members: usize = raw
        .metadata
        .get(META_JOINT_STATE)
        .and_then(|n| n.parse().ok())
        .filter(|&n| (1..=4096).contains(&n))
        .ok_or_else(|| {
            RuntimeError::checkpoint(
                source_name,
                "not a joint training state (no valid nt.joint_state metadata)",
            )
        })?;
    let mut parts: Vec<StateDict> = vec![StateDict::default(); members];
    for (name, t) in raw.tensors {
        let (k, rest) = name
            .strip_prefix("member-")
            .and_then(|r| r.split_once('/'))
            .and_then(|(k, rest)| Some((k.parse::<usize>().ok()?, rest)))
            .filter(|(k, _)| *k < members)
            .ok_or_else(|| {
                RuntimeError::checkpoint(
                    source_name,
                    format!("unexpected tensor `{name}` in a joint training state"),
                )
            })?;
        if parts[k].get(rest).is_some() {
            return Err(RuntimeError::checkpoint(
                source_name,
                format!("tensor `{rest}` of member {k} appears twice"),
            ));
        }
        parts[k].insert(rest, t);
    }
    parts
        .into_iter()
        .enumerate()
        .map(|(k, mut part)| {
            let meta = raw
                .metadata
                .get(&format!("{META_TRAIN_STATE}.{k}"))
                .ok_or_else(|| {
                    RuntimeError::checkpoint(source_name, format!("member {k} has no epoch record"))
                })?;
            part.metadata = raw.metadata.clone();
            part.metadata
                .retain(|key, _| !key.starts_with(META_TRAIN_STATE) && key != META_JOINT_STATE);
            part.metadata.insert(META_TRAIN_STATE.into(), meta.clone());
            train_state_from_bytes(source_name, to_bytes(&part)?)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use fusion::state::HostTensor;

    fn state(k: usize) -> super::super::TrainState {
        let mut model = StateDict::default();
        model.insert("fc.weight", HostTensor::f32(vec![2], vec![k as f32, 1.0]));
        let mut momentum = StateDict::default();
        momentum.insert("fc.weight", HostTensor::f32(vec![2], vec![0.5, k as f32]));
        super::super::TrainState {
            epoch: 3,
            model,
            momentum,
            history: Vec::new(),
        }
    }

    #[test]
    fn a_joint_state_reads_back_per_member_and_refuses_strangers() {
        let bytes = joint_state_to_bytes(&[state(0), state(1), state(2)]).unwrap();
        let back = joint_state_from_bytes("s", bytes).unwrap();
        assert_eq!(back.len(), 3);
        for (k, s) in back.iter().enumerate() {
            assert_eq!(s.epoch, 3);
            assert_eq!(
                s.model.get("fc.weight").unwrap().as_f32().unwrap(),
                [k as f32, 1.0]
            );
            assert_eq!(
                s.momentum.get("fc.weight").unwrap().as_f32().unwrap(),
                [0.5, k as f32]
            );
        }
        let single = train_state_to_bytes(&state(0)).unwrap();
        let err = joint_state_from_bytes("single.safetensors", single).unwrap_err();
        assert!(
            err.to_string().contains("not a joint training state"),
            "{err}"
        );
    }
}
