//! The fusion methods behind one entry point, [`fuse`].

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::arch::Architecture;
use crate::assemble::{all_channels, assemble};
use crate::check::{GuardReport, StepCheck};
use crate::checkpoint::{self, Lineage};
use crate::coupling::{Coupling, GroupKind};
use crate::state::{DType, HostTensor, StateDict};
use crate::transplant::{self, Transplanted};
use crate::{FusionError, Result};

/// How K members become one model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// Neuron Transplantation: concatenate all members, keep the largest neurons.
    Nt,
    /// NT of member 0 with member 1, the result with member 2, and so on.
    NtIterative,
    /// NT of halves, recursively.
    NtHierarchical,
    /// The wide concatenated model (its logits are the ensemble's mean); K times wider.
    Concat,
    /// Vanilla weight averaging.
    Average,
    /// Optimal-transport fusion (the paper's baseline): members aligned to
    /// member 0 neuron by neuron, then averaged ([`crate::ot`]).
    Ot,
}

impl Method {
    pub const ALL: [Method; 6] = [
        Method::Nt,
        Method::NtIterative,
        Method::NtHierarchical,
        Method::Concat,
        Method::Average,
        Method::Ot,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Method::Nt => "nt",
            Method::NtIterative => "nt-iterative",
            Method::NtHierarchical => "nt-hierarchical",
            Method::Concat => "concat",
            Method::Average => "average",
            Method::Ot => "ot",
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Method {
    type Err = FusionError;
    fn from_str(s: &str) -> Result<Self> {
        Method::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                FusionError::Unsupported(format!(
                    "unknown fusion method `{s}` (known: {})",
                    Method::ALL.map(Method::as_str).join(", ")
                ))
            })
    }
}

/// What a group kept.
#[derive(Clone, Debug, Serialize)]
pub struct GroupReport {
    /// The layers writing the group.
    pub layers: String,
    pub width: usize,
    /// Channels of the result that came from each original member.
    pub kept_per_member: Vec<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct FuseReport {
    pub method: Method,
    pub members: usize,
    pub arch: String,
    pub parameters: usize,
    pub groups: Vec<GroupReport>,
    pub guard: GuardReport,
    pub seconds: f64,
}

/// A fused model: its tensors (architecture and lineage in the metadata),
/// its architecture (wider than the members' for `concat`) and a report.
pub struct Fused {
    pub state: StateDict,
    pub arch: Architecture,
    pub report: FuseReport,
}

fn check_members(arch: &Architecture, members: &[&StateDict]) -> Result<()> {
    if members.len() < 2 {
        return Err(FusionError::Members(format!(
            "fusion needs at least 2 members, got {}",
            members.len()
        )));
    }
    for (i, m) in members.iter().enumerate() {
        checkpoint::validate(m, arch, &format!("member {i}"))?;
        if let Some(recorded) = m.arch() {
            let recorded = recorded?;
            if !checkpoint::same_network(&recorded, arch) {
                return Err(FusionError::Members(format!(
                    "member {i} records architecture `{}`, which differs from `{}` it is fused as",
                    recorded.name,
                    arch.name()
                )));
            }
        }
    }
    Ok(())
}

/// Element-wise mean of the members (integer counters: floor of the mean).
pub fn average(arch: &Architecture, members: &[&StateDict]) -> Result<StateDict> {
    let k = members.len();
    let mut state = StateDict::default();
    for p in arch.params() {
        let get = |m: &StateDict| {
            m.get(&p.name)
                .cloned()
                .ok_or_else(|| FusionError::Members(format!("a member lacks `{}`", p.name)))
        };
        let first = get(members[0])?;
        let tensor = match p.dtype {
            DType::F32 => {
                let mut acc = vec![0.0f32; first.numel()];
                for m in members {
                    let t = get(m)?;
                    for (a, x) in acc.iter_mut().zip(t.as_f32().unwrap_or(&[])) {
                        *a += x;
                    }
                }
                acc.iter_mut().for_each(|a| *a /= k as f32);
                HostTensor::f32(p.shape.clone(), acc)
            }
            DType::I64 => {
                let mut acc = vec![0i64; first.numel()];
                for m in members {
                    let t = get(m)?;
                    for (a, x) in acc.iter_mut().zip(t.as_i64().unwrap_or(&[])) {
                        *a += x;
                    }
                }
                acc.iter_mut().for_each(|a| *a = a.div_euclid(k as i64));
                HostTensor::i64(p.shape.clone(), acc)
            }
        };
        state.insert(p.name, tensor);
    }
    Ok(state)
}

/// Fuses `members` (all of architecture `arch`) with `method`, every step
/// checked by `check` (the runtime's exactness guard, or [`crate::check::NoCheck`]).
pub fn fuse(
    method: Method,
    arch: &Architecture,
    members: &[&StateDict],
    check: &mut dyn StepCheck,
) -> Result<Fused> {
    let start = Instant::now();
    check_members(arch, members)?;
    let k = members.len();
    let coupling = Coupling::derive(arch)?;

    let (mut state, result_arch, origins) = match method {
        Method::Average => (average(arch, members)?, arch.clone(), None),
        Method::Ot => (
            crate::ot::fuse(arch, &coupling, members)?,
            arch.clone(),
            None,
        ),
        Method::Concat => {
            crate::heap::unmeasured(|| check.check(arch, &coupling, members, None))?;
            let spec = coupling.resized(
                arch,
                &coupling.wide_widths(k),
                &format!("{}-concat{k}", arch.name()),
            );
            let state = assemble(arch, &coupling, members, &all_channels(&coupling, k))?;
            let origins = coupling
                .groups()
                .iter()
                .map(|g| {
                    (g.kind == GroupKind::Hidden)
                        .then(|| (0..k).flat_map(|m| vec![m; g.width]).collect())
                })
                .collect();
            (state, Architecture::new(spec)?, Some(origins))
        }
        Method::Nt | Method::NtIterative | Method::NtHierarchical => {
            let mut hook = |step_members: &[&StateDict],
                            selections: &[crate::assemble::Selection],
                            fused: &StateDict| {
                // The guard's wide model is a check of the method, not
                // part of it: it does not count towards the fusion's peak.
                crate::heap::unmeasured(|| {
                    check.check(arch, &coupling, step_members, Some((selections, fused)))
                })
            };
            let Transplanted { state, origins } = match method {
                Method::Nt => transplant::nt(arch, &coupling, members, &mut hook)?,
                Method::NtIterative => {
                    transplant::nt_iterative(arch, &coupling, members, &mut hook)?
                }
                _ => transplant::nt_hierarchical(arch, &coupling, members, &mut hook)?,
            };
            (state, arch.clone(), Some(origins))
        }
    };

    let groups = match origins {
        None => Vec::new(),
        Some(origins) => coupling
            .prune_order()
            .into_iter()
            .rev()
            .map(|g| {
                let mut kept = vec![0; k];
                if let Some(o) = &origins[g] {
                    for &m in o {
                        kept[m] += 1;
                    }
                }
                GroupReport {
                    layers: coupling.label(arch, g),
                    width: coupling.group(g).width,
                    kept_per_member: kept,
                }
            })
            .collect(),
    };
    state.set_arch(result_arch.spec());
    // The fused model takes its inputs the way its members did.
    if let Some(input) = members[0].input() {
        if members.iter().all(|m| m.input().as_ref() == Some(&input)) {
            state.set_input(&input);
        }
    }
    state.set_lineage(&Lineage {
        method: method.to_string(),
        ..Default::default()
    });
    let report = FuseReport {
        method,
        members: k,
        arch: result_arch.name().to_string(),
        parameters: result_arch.parameter_count(),
        groups,
        guard: check.report(),
        seconds: start.elapsed().as_secs_f64(),
    };
    Ok(Fused {
        state,
        arch: result_arch,
        report,
    })
}
