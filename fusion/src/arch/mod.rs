//! Architectures: the declarative spec, its validation, and the presets.

mod builder;
mod graph;
pub mod presets;
mod spec;
mod torchvision;

pub use graph::{Architecture, Node, ParamRole, ParamSpec, Source};
pub use presets::{preset, SpecBuilder, PRESETS};
pub use spec::{ArchSpec, GeluApproximation, NodeSpec, Op, PoolSize, FORMAT};
pub use torchvision::{bottleneck_resnet_spec, mobilenet_v2_spec, torchvision_vgg_spec};

use crate::{FusionError, Result};

/// Resolves what a user typed for `--arch`: a spec file (a path to an
/// existing file, or anything ending in `.json`) or a preset name.
pub fn resolve(arch: &str) -> Result<Architecture> {
    let path = std::path::Path::new(arch);
    if path.is_file() || arch.ends_with(".json") {
        let text = std::fs::read_to_string(path).map_err(|e| FusionError::io(path, e))?;
        let spec = ArchSpec::from_json(&text)
            .map_err(|e| FusionError::spec(format!("{}: {e}", path.display())))?;
        Architecture::new(spec).map_err(|e| FusionError::spec(format!("{}: {e}", path.display())))
    } else {
        Architecture::new(preset(arch)?)
    }
}
