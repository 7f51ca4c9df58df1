//! Where a run's tasks may run.

use serde::{Deserialize, Serialize};

/// Where a run's tasks may run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Any,
    Gpu,
    Cpu,
}
