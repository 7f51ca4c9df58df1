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
    tonic_prost_build::configure()
        // Serde on every message, so the coordinator can keep runs as
        // readable JSON documents in the object store.
        .type_attribute(".nt.v1", "#[derive(serde::Serialize, serde::Deserialize)]")
        .message_attribute(".nt.v1", "#[serde(default)]")
        .file_descriptor_set_path(out.join("nt_v1_descriptor.bin"))
        .compile_protos(&protos, &["."])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
