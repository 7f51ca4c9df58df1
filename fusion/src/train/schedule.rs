//! Learning-rate schedules, stepped once per epoch like PyTorch's schedulers.

use serde::{Deserialize, Serialize};

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
}
