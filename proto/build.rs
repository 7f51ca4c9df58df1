// Compiles nt/v1/*.proto into OUT_DIR with a vendored protoc, so no system
// package is needed, and writes the descriptor set that reflection serves.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "nt/v1/spec.proto",
        "nt/v1/runs.proto",
        "nt/v1/workers.proto",
    ];
    let mut config = tonic_prost_build::configure()
        // Serde on every message, so the coordinator can keep runs as
        // readable JSON documents in the object store.
        .type_attribute(".nt.v1", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".nt.v1", "#[serde(default)]");
    // Enum fields as names in JSON (see src/enum_names.rs).
    let enums = [
        ("ListRunsRequest.state", "run_state"),
        ("Run.state", "run_state"),
        ("RunStateChanged.state", "run_state"),
        ("TaskStatus.kind", "task_kind"),
        ("Task.kind", "task_kind"),
        ("TaskStatus.state", "task_state"),
        ("TaskStateChanged.state", "task_state"),
        ("FusedReport.method", "fusion_method"),
        ("RunSpec.fusion", "fusion_method::list"),
        ("RunSpec.device", "device_requirement"),
        ("Task.device", "device_requirement"),
        ("TaskInstruction.directive", "task_directive"),
        ("ReportProgressResponse.directive", "task_directive"),
    ];
    for (field, module) in enums {
        config = config.field_attribute(
            format!(".nt.v1.{field}"),
            format!("#[serde(with = \"crate::enum_names::{module}\")]"),
        );
    }
    // Measurements that may be NaN or infinite (see src/floats.rs).
    for field in [
        "TaskProgress.loss",
        "TaskProgress.accuracy",
        "TaskProgress.samples_per_second",
        "TaskProgress.lr",
        "ModelReport.accuracy",
        "ModelReport.loss",
        "CurvePoint.train_loss",
        "CurvePoint.train_accuracy",
        "CurvePoint.eval_accuracy",
        "CurvePoint.eval_loss",
    ] {
        config = config.field_attribute(
            format!(".nt.v1.{field}"),
            "#[serde(with = \"crate::floats\")]",
        );
    }
    config = config.field_attribute(
        ".nt.v1.TaskProgress.eval_accuracy",
        "#[serde(with = \"crate::floats::optional\")]",
    );
    config
        .file_descriptor_set_path(out.join("nt_v1_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
