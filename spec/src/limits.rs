//! Ceilings on what a run may make a worker do, checked when a run is
//! submitted (a run accepted earlier is not checked again after a restart).
//! The coordinator's operator sets them (`nt-server --max-...`); a spec over
//! one is refused naming the limit, before anything is stored or leased.

use crate::plan::{MemberPlan, Plan};
use crate::SpecError;

/// What one run may ask of the service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Trainable parameters of the architecture.
    pub max_parameters: u64,
    /// Estimated training memory of the activations of one batch: every
    /// node's output, in float32, three times over (the forward values kept
    /// for the backward pass, their gradients, and room for workspaces).
    pub max_activation_bytes: u64,
    /// Members of one run.
    pub max_members: usize,
    /// Epochs of one training or fine-tuning.
    pub max_epochs: usize,
    /// Decoded size of a generated (synthetic) data set, both splits.
    pub max_data_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_parameters: 1_000_000_000,
            max_activation_bytes: 32 << 30,
            max_members: crate::defaults::MAX_MEMBERS,
            max_epochs: 1_000_000,
            max_data_bytes: 16 << 30,
        }
    }
}

fn over(field: &str, what: String, limit: impl std::fmt::Display, flag: &str) -> SpecError {
    SpecError::new(
        field,
        format!("{what}, over the service's limit of {limit} (nt-server --{flag})"),
    )
}

impl Limits {
    /// Refuses a plan over any limit; the error names the field and the limit.
    pub fn check(&self, plan: &Plan) -> Result<(), SpecError> {
        let arch = &plan.arch;
        let parameters: u64 = arch
            .params()
            .iter()
            .filter(|p| p.role.trainable())
            .map(|p| numel(&p.shape))
            .fold(0, u64::saturating_add);
        if parameters > self.max_parameters {
            return Err(over(
                "architecture",
                format!("`{}` has {parameters} parameters", arch.name()),
                self.max_parameters,
                "max-parameters",
            ));
        }
        let per_sample: u64 = arch
            .nodes()
            .iter()
            .map(|n| numel(&n.out_shape))
            .fold(numel(arch.input_shape()), u64::saturating_add);
        let configs: Vec<_> = match &plan.members {
            MemberPlan::Train(c) => c.iter().chain([&plan.fine_tune]).collect(),
            MemberPlan::Existing(_) => vec![&plan.fine_tune],
        };
        let batch = configs
            .iter()
            .map(|c| c.batch_size)
            .chain([plan.eval_batch])
            .max()
            .unwrap_or(1) as u64;
        let activations = per_sample.saturating_mul(batch).saturating_mul(4 * 3);
        if activations > self.max_activation_bytes {
            return Err(over(
                "architecture",
                format!(
                    "`{}` needs about {activations} bytes of activations for a batch of {batch}",
                    arch.name()
                ),
                self.max_activation_bytes,
                "max-activation-bytes",
            ));
        }
        let members = match &plan.members {
            MemberPlan::Train(c) => c.len(),
            MemberPlan::Existing(k) => k.len(),
        };
        if members > self.max_members {
            return Err(over(
                "members",
                format!("{members} members"),
                self.max_members,
                "max-members",
            ));
        }
        for (field, c) in configs.iter().enumerate().map(|(i, c)| {
            let last = i + 1 == configs.len();
            (
                if last {
                    "fine_tuning.training.epochs"
                } else {
                    "members.training.epochs"
                },
                c,
            )
        }) {
            if c.epochs > self.max_epochs {
                return Err(over(
                    field,
                    format!("{} epochs", c.epochs),
                    self.max_epochs,
                    "max-epochs",
                ));
            }
        }
        if let Some(s) = &plan.data.synthetic {
            let bytes =
                numel(&s.shape).saturating_mul((s.train as u64).saturating_add(s.test as u64));
            if bytes > self.max_data_bytes {
                return Err(over(
                    "data.synthetic",
                    format!(
                        "{} + {} samples of {:?} make {bytes} bytes",
                        s.train, s.test, s.shape
                    ),
                    self.max_data_bytes,
                    "max-data-bytes",
                ));
            }
        }
        Ok(())
    }
}

/// The number of elements of a shape, saturating instead of overflowing.
fn numel(shape: &[usize]) -> u64 {
    shape.iter().fold(1u64, |n, &d| n.saturating_mul(d as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::file::RunSpecFile;

    fn plan(yaml: &str) -> Plan {
        let wire = RunSpecFile::from_yaml(yaml)
            .and_then(|f| f.to_proto(std::path::Path::new(".")))
            .unwrap();
        Plan::from_wire(&wire, &|r| Ok(r.to_string())).unwrap()
    }

    #[test]
    fn specs_over_a_limit_are_refused_naming_it() {
        let limits = Limits::default();
        limits
            .check(&plan("architecture: mlp\nmembers: {count: 2}\n"))
            .unwrap();
        let e = limits
            .check(&plan(
                "architecture: mlp:hidden=200000,depth=8\nmembers: {count: 2}\n",
            ))
            .unwrap_err();
        assert_eq!(e.field, "architecture");
        assert!(e.message.contains("--max-parameters"), "{e}");
        let e = limits
            .check(&plan(
                "data: {dataset: synthetic, synthetic: {train: 100000000000}}\n\
                 architecture: mlp\nmembers: {count: 2}\n",
            ))
            .unwrap_err();
        assert_eq!(e.field, "data.synthetic");
        assert!(e.message.contains("--max-data-bytes"), "{e}");
        let e = limits
            .check(&plan(
                "architecture: mlp\nmembers: {count: 2, training: {epochs: 2000000}}\n",
            ))
            .unwrap_err();
        assert_eq!(e.field, "members.training.epochs");
        let few = Limits {
            max_members: 3,
            ..Limits::default()
        };
        let e = few
            .check(&plan("architecture: mlp\nmembers: {count: 4}\n"))
            .unwrap_err();
        assert_eq!(e.field, "members");
        // 784-512-512-512-10 with its ReLUs: about 3,600 floats per sample.
        let small = Limits {
            max_activation_bytes: 1 << 30,
            ..Limits::default()
        };
        small
            .check(&plan("architecture: mlp\nmembers: {count: 2}\n"))
            .unwrap();
        let e = small
            .check(&plan(
                "architecture: mlp\nmembers: {count: 2, training: {batch_size: 100000}}\n",
            ))
            .unwrap_err();
        assert!(e.message.contains("--max-activation-bytes"), "{e}");
    }
}
