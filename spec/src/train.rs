//! Training settings: the plain config every trainer reads, with the
//! paper's protocol as its defaults (see [`crate::defaults`]).

use serde::{Deserialize, Serialize};

use crate::data::Augment;
use crate::defaults;
use crate::SpecError;

/// Knowledge distillation from the ensemble of teachers: the loss is
/// `weight * T^2 * CE(softmax(teacher/T), student/T) + (1 - weight) * CE(labels)`,
/// as in the paper's distillation variant.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Distill {
    #[serde(default = "default_temperature")]
    pub temperature: f64,
    /// Weight of the soft targets (the hard labels get 1 - weight).
    #[serde(default = "default_soft_weight")]
    pub weight: f64,
}

fn default_temperature() -> f64 {
    defaults::DISTILL_TEMPERATURE
}
fn default_soft_weight() -> f64 {
    defaults::DISTILL_WEIGHT
}

impl Default for Distill {
    fn default() -> Self {
        Distill {
            temperature: default_temperature(),
            weight: default_soft_weight(),
        }
    }
}

/// How to train. Defaults are the paper's protocol for MLPs and LeNet.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub schedule: Schedule,
    /// Seeds initialisation (when the trainer initialises), data order, augmentation and dropout.
    pub seed: u64,
    /// Compute linear and conv layers in bfloat16 (weights stay float32); GPU only.
    pub bf16: bool,
    /// Augmentation of training batches.
    pub augment: Augment,
    /// Distil from teachers (when teachers are given).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub distill: Option<Distill>,
    /// Report progress every this many steps (and at every epoch's end).
    pub log_every: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            epochs: defaults::EPOCHS,
            batch_size: defaults::BATCH_SIZE,
            lr: defaults::LR,
            momentum: defaults::MOMENTUM,
            weight_decay: defaults::WEIGHT_DECAY,
            nesterov: false,
            schedule: Schedule::Constant,
            seed: 0,
            bf16: false,
            augment: Augment::default(),
            distill: None,
            log_every: defaults::LOG_EVERY,
        }
    }
}

impl TrainConfig {
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |m: String| Err(SpecError::new("training", m));
        if self.batch_size == 0 {
            return bad("batch_size must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr must be positive, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad(format!("momentum must be in [0, 1), got {}", self.momentum));
        }
        if self.weight_decay < 0.0 || !self.weight_decay.is_finite() {
            return bad(format!(
                "weight_decay must be >= 0, got {}",
                self.weight_decay
            ));
        }
        if self.nesterov && self.momentum == 0.0 {
            return bad("nesterov needs a non-zero momentum".into());
        }
        self.schedule
            .validate()
            .map_err(|m| SpecError::new("training", m))?;
        if let Some(d) = self.distill {
            let usable =
                d.temperature > 0.0 && d.temperature.is_finite() && (0.0..=1.0).contains(&d.weight);
            if !usable {
                return bad(format!(
                    "distillation needs temperature > 0 and weight in [0, 1], got {} and {}",
                    d.temperature, d.weight
                ));
            }
        }
        Ok(())
    }
}

/// A learning-rate schedule, stepped once per epoch like PyTorch's schedulers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Schedule {
    /// The base rate throughout (the paper's MLP and LeNet protocol).
    #[default]
    Constant,
    /// Multiply by `gamma` every `every` epochs (the paper's VGG/ResNet
    /// protocol halves the rate every 30 epochs).
    Step { every: usize, gamma: f64 },
    /// Multiply by `gamma` at each milestone epoch.
    MultiStep { milestones: Vec<usize>, gamma: f64 },
    /// Cosine annealing from the base rate to `min_lr` over all epochs.
    Cosine {
        #[serde(default)]
        min_lr: f64,
    },
}

impl Schedule {
    /// Refuses settings that would make the rate non-finite, negative or
    /// undefined: every number must be finite.
    pub fn validate(&self) -> Result<(), String> {
        let gamma_ok = |g: f64| g > 0.0 && g.is_finite();
        match self {
            Schedule::Constant => Ok(()),
            Schedule::Step { every, gamma } => {
                if *every == 0 {
                    Err("schedule.every must be at least 1".into())
                } else if !gamma_ok(*gamma) {
                    Err(format!(
                        "schedule.gamma must be positive and finite, got {gamma}"
                    ))
                } else {
                    Ok(())
                }
            }
            Schedule::MultiStep { gamma, .. } if !gamma_ok(*gamma) => Err(format!(
                "schedule.gamma must be positive and finite, got {gamma}"
            )),
            Schedule::MultiStep { .. } => Ok(()),
            Schedule::Cosine { min_lr } if !(*min_lr >= 0.0 && min_lr.is_finite()) => Err(format!(
                "schedule.min_lr must be finite and at least 0, got {min_lr}"
            )),
            Schedule::Cosine { .. } => Ok(()),
        }
    }

    /// The rate during epoch `epoch` (0-based) of `epochs`.
    pub fn lr(&self, base: f64, epoch: usize, epochs: usize) -> f64 {
        match self {
            Schedule::Constant => base,
            Schedule::Step { every, gamma } => base * gamma.powi((epoch / (*every).max(1)) as i32),
            Schedule::MultiStep { milestones, gamma } => {
                base * gamma.powi(milestones.iter().filter(|&&m| m <= epoch).count() as i32)
            }
            Schedule::Cosine { min_lr } => {
                let t = epoch as f64 / epochs.max(1) as f64;
                min_lr + (base - min_lr) * (1.0 + (std::f64::consts::PI * t).cos()) / 2.0
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_pytorch() {
        assert_eq!(Schedule::Constant.lr(0.1, 7, 10), 0.1);
        let step = Schedule::Step {
            every: 30,
            gamma: 0.5,
        };
        assert_eq!(step.lr(0.05, 29, 100), 0.05);
        assert_eq!(step.lr(0.05, 30, 100), 0.025);
        assert_eq!(step.lr(0.05, 65, 100), 0.0125);
        let multi = Schedule::MultiStep {
            milestones: vec![2, 5],
            gamma: 0.1,
        };
        assert!((multi.lr(1.0, 5, 10) - 0.01).abs() < 1e-12);
        let cos = Schedule::Cosine { min_lr: 0.0 };
        assert_eq!(cos.lr(1.0, 0, 10), 1.0);
        assert!((cos.lr(1.0, 5, 10) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn schedules_and_settings_with_non_finite_numbers_are_refused() {
        let bad = [
            Schedule::Step {
                every: 1,
                gamma: f64::NAN,
            },
            Schedule::Step {
                every: 0,
                gamma: 0.5,
            },
            Schedule::MultiStep {
                milestones: vec![1],
                gamma: f64::INFINITY,
            },
            Schedule::Cosine {
                min_lr: f64::INFINITY,
            },
            Schedule::Cosine { min_lr: -0.1 },
        ];
        for schedule in bad {
            let config = TrainConfig {
                schedule: schedule.clone(),
                ..TrainConfig::default()
            };
            let e = config.validate().unwrap_err();
            assert!(e.message.starts_with("schedule."), "{schedule:?}: {e}");
        }
        let hot = TrainConfig {
            distill: Some(Distill {
                temperature: f64::INFINITY,
                weight: 0.5,
            }),
            ..TrainConfig::default()
        };
        assert!(hot.validate().is_err());
        assert!(TrainConfig::default().validate().is_ok());
    }
}
