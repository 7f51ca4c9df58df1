// Compiles the protos into OUT_DIR with a vendored protoc, so no system
// package is needed: nt/v1 (the API, with the descriptor set that reflection
// serves) and nt/store/v1 (the coordinator's stored documents, kept out of
// that set). pbjson-build then generates every message's serde impls from
// the descriptors: the proto3 JSON mapping, with no hand-kept name tables.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use prost::Message;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FileDescriptorSet};

type Result<T> = std::result::Result<T, Box<dyn std::error::Error>>;

const API: [&str; 3] = [
    "nt/v1/spec.proto",
    "nt/v1/runs.proto",
    "nt/v1/workers.proto",
];
const STORE: [&str; 1] = ["nt/store/v1/run_document.proto"];

fn main() -> Result<()> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let api_set = out.join("nt_v1_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&api_set)
        .compile_protos(&API, &["."])?;
    let store_set = out.join("nt_store_v1_descriptor.bin");
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(false)
        .extern_path(".nt.v1", "crate::v1")
        .file_descriptor_set_path(&store_set)
        .compile_protos(&STORE, &["."])?;

    // Every file once: the API's set, and the store's own files from its set
    // (which also holds the nt/v1 files it imports).
    let mut set = FileDescriptorSet::decode(std::fs::read(&api_set)?.as_slice())?;
    let store = FileDescriptorSet::decode(std::fs::read(&store_set)?.as_slice())?;
    set.file.extend(
        store
            .file
            .into_iter()
            .filter(|f| f.package() == "nt.store.v1"),
    );
    let mut pbjson = pbjson_build::Builder::new();
    for file in &set.file {
        pbjson.register_file_descriptor(file.clone());
    }
    pbjson
        // As prost's binary decoding does, and as the serde derives before
        // did: a field this build does not know (a newer peer's) is skipped.
        .ignore_unknown_fields()
        .build(&[".nt.v1", ".nt.store.v1"])?;
    for package in ["nt.v1", "nt.store.v1"] {
        route_floats(&out.join(format!("{package}.serde.rs")), &set, package)?;
    }
    for p in API.iter().chain(&STORE) {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}

/// pbjson hands a double to the serializer as it is, and serde_json writes a
/// non-finite f64 as `null` (influxdata/pbjson#106), where proto3 JSON has
/// "NaN", "Infinity" and "-Infinity"; a NaN loss would then read back as an
/// error here and as 0 in Python. So every float and double field of
/// `package` found in the descriptors is serialized through
/// `crate::json::ProtoFloat` instead. The generated code is matched line by
/// line: each message's `Serialize` impl names the message in its
/// `serialize_struct` call and then has one `serialize_field` call per field.
/// A pbjson release that writes them otherwise fails the count below, not
/// the output silently.
fn route_floats(path: &Path, set: &FileDescriptorSet, package: &str) -> Result<()> {
    let mut floats = HashSet::new();
    for file in set.file.iter().filter(|f| f.package() == package) {
        for m in &file.message_type {
            float_fields(&format!("{package}.{}", m.name()), m, &mut floats);
        }
    }
    let text = std::fs::read_to_string(path)?;
    let mut out = String::with_capacity(text.len() + 4096);
    let mut message: Option<&str> = None;
    let mut routed = HashSet::new();
    for line in text.lines() {
        let code = line.trim_start();
        if line.starts_with("impl ") {
            message = None;
        } else if let Some(rest) = code
            .strip_prefix("let mut struct_ser = serializer.serialize_struct(\"")
            .or_else(|| code.strip_prefix("let struct_ser = serializer.serialize_struct(\""))
        {
            message = rest.split('"').next();
        } else if let (Some(m), Some(rest)) =
            (message, code.strip_prefix("struct_ser.serialize_field(\""))
        {
            if let Some((name, value)) = rest.split_once("\", ") {
                let key = (m.to_string(), name.to_string());
                if floats.contains(&key) {
                    let value = value
                        .strip_suffix(")?;")
                        .ok_or_else(|| format!("{}: unexpected line `{line}`", path.display()))?;
                    let indent = &line[..line.len() - code.len()];
                    out.push_str(&format!(
                        "{indent}struct_ser.serialize_field(\"{name}\", \
                         &crate::json::ProtoFloat({value}))?;\n"
                    ));
                    routed.insert(key);
                    continue;
                }
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    if routed != floats {
        let missed: Vec<_> = floats.difference(&routed).collect();
        return Err(format!(
            "{}: no serialize_field call found for the float fields {missed:?}; \
             did pbjson change how it writes them?",
            path.display()
        )
        .into());
    }
    std::fs::write(path, out)?;
    Ok(())
}

/// (message, JSON name) of each float and double field of `m` and of the
/// messages nested in it.
fn float_fields(name: &str, m: &DescriptorProto, out: &mut HashSet<(String, String)>) {
    for f in &m.field {
        if matches!(f.r#type(), Type::Double | Type::Float) {
            out.insert((name.to_string(), f.json_name().to_string()));
        }
    }
    for nested in &m.nested_type {
        float_fields(&format!("{name}.{}", nested.name()), nested, out);
    }
}
