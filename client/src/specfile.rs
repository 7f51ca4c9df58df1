//! Run spec files with command-line overrides: `--set key.path=value`
//! changes any field before the spec is checked, so unknown fields and bad
//! values are still refused with the field's name.

use std::path::Path;

use anyhow::{bail, Context, Result};
use nt_spec::RunSpecFile;
use serde_yaml::Value;

/// Sets `path` (dot-separated, e.g. `members.training.epochs`) to `value`,
/// parsed as YAML (so `3` is a number, `[nt, average]` a list).
pub fn set_path(doc: &mut Value, path: &str, value: &str) -> Result<()> {
    nt_spec::nesting::check_yaml(value).with_context(|| format!("--set {path}"))?;
    let parsed: Value = serde_yaml::from_str(value)
        .with_context(|| format!("--set {path}: `{value}` is not a YAML value"))?;
    let keys: Vec<&str> = path.split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        bail!("--set: `{path}` is not a dot-separated field path");
    }
    let mut node = doc;
    for (i, key) in keys.iter().enumerate() {
        if node.is_null() {
            *node = Value::Mapping(Default::default());
        }
        let Value::Mapping(map) = node else {
            bail!("--set {path}: `{}` is not a mapping", keys[..i].join("."));
        };
        let k = Value::String((*key).to_string());
        if i + 1 == keys.len() {
            map.insert(k, parsed);
            return Ok(());
        }
        node = map.entry(k).or_insert(Value::Null);
    }
    Ok(())
}

/// Reads a spec file and applies `key=value` overrides in order.
pub fn load(path: &Path, overrides: &[(String, String)]) -> Result<RunSpecFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the run spec {}", path.display()))?;
    parse(&text, overrides).with_context(|| format!("run spec {}", path.display()))
}

/// Parses spec text and applies overrides.
pub fn parse(text: &str, overrides: &[(String, String)]) -> Result<RunSpecFile> {
    nt_spec::nesting::check_yaml(text)?;
    let mut doc: Value = serde_yaml::from_str(text).context("not valid YAML")?;
    for (k, v) in overrides {
        set_path(&mut doc, k, v)?;
    }
    let again = serde_yaml::to_string(&doc)?;
    Ok(RunSpecFile::from_yaml(&again)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_change_fields_and_typos_are_still_refused() {
        let base = "architecture: mlp\nmembers: {count: 2}\n";
        let spec = parse(
            base,
            &[
                ("members.count".into(), "4".into()),
                ("members.training.epochs".into(), "3".into()),
                ("fusion".into(), "[nt, average]".into()),
            ],
        )
        .unwrap();
        assert_eq!(spec.members.count, Some(4));
        assert_eq!(spec.members.training.epochs, Some(3));
        assert_eq!(spec.fusion, ["nt", "average"]);
        let err = parse(base, &[("members.trainig.epochs".into(), "3".into())]).unwrap_err();
        assert!(format!("{err:#}").contains("trainig"), "{err:#}");
        let err = parse(base, &[("architecture.preset.x".into(), "3".into())]).unwrap_err();
        assert!(format!("{err:#}").contains("not a mapping"), "{err:#}");
    }

    #[test]
    fn deep_yaml_is_refused_before_parsing() {
        let deep = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        let started = std::time::Instant::now();
        let err = parse(&format!("architecture: {deep}\n"), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("1024"), "{err:#}");
        let err = parse("architecture: mlp\n", &[("labels.a".into(), deep)]).unwrap_err();
        assert!(format!("{err:#}").contains("--set labels.a"), "{err:#}");
        // Both took 37 s of CPU each before the pre-scan.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }
}
