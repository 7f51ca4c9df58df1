//! A cheap pre-scan of YAML text for deep nesting, run before the YAML
//! parser. libyaml's time grows with the square of the depth of flow
//! collections (`[[[...]]]`): 16,000 levels take 2 s, 100,000 take 37 s,
//! only for serde_yaml to refuse the document past its 128 levels. The scan
//! reads each byte once and refuses such a document in microseconds.
//!
//! The depth it measures is an estimate, not a parse: open flow collections
//! outside quotes and comments, plus the block levels of the line (its
//! indentation levels and its `- `, `? ` and `: ` indicators). A second,
//! quote-blind bound on the number of `[` and `{` keeps quoting tricks from
//! hiding deep flow nesting from the estimate.

use crate::SpecError;

/// Deepest nesting a spec may have; real specs use fewer than 10 levels.
pub const MAX_DEPTH: usize = 64;

/// Most `[` and `{` a spec may hold anywhere, quoted or not: a bound on the
/// depth of flow nesting that no quoting can fool (1,024 levels parse in 8 ms).
pub const MAX_FLOW_OPENERS: usize = 1024;

/// Refuses YAML nested deeper than [`MAX_DEPTH`] levels (or holding more than
/// [`MAX_FLOW_OPENERS`] brackets) before any parser sees it.
pub fn check_yaml(text: &str) -> Result<(), SpecError> {
    let openers = text.bytes().filter(|b| matches!(b, b'[' | b'{')).count();
    if openers > MAX_FLOW_OPENERS {
        return Err(SpecError::new(
            "spec",
            format!(
                "holds {openers} `[` and `{{`, more than the {MAX_FLOW_OPENERS} nt reads \
                 (refused before parsing: deep flow nesting is slow to parse)"
            ),
        ));
    }
    match deepest(text) {
        Some((depth, line)) => Err(SpecError::new(
            "spec",
            format!(
                "nested more than {MAX_DEPTH} levels deep (about {depth} at line {line}); \
                 refused before parsing"
            ),
        )),
        None => Ok(()),
    }
}

/// The first line whose estimated depth passes [`MAX_DEPTH`], with that depth.
fn deepest(text: &str) -> Option<(usize, usize)> {
    let mut flow = 0usize;
    let mut quote: Option<u8> = None;
    let mut indents: Vec<usize> = Vec::new();
    let mut block_scalar: Option<usize> = None;
    for (number, line) in text.split('\n').enumerate() {
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|&&b| b == b' ').count();
        let blank = bytes[indent..].iter().all(|b| b.is_ascii_whitespace());
        if let Some(parent) = block_scalar {
            if blank || indent > parent {
                continue;
            }
            block_scalar = None;
        }
        let starts_block = quote.is_none() && flow == 0;
        if starts_block && !blank && bytes[indent] != b'#' {
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        let mut compact = 0usize;
        let mut prev: Option<u8> = None;
        let mut last = None;
        let mut i = indent;
        while i < bytes.len() {
            let b = bytes[i];
            let next = bytes.get(i + 1).copied();
            if let Some(q) = quote {
                if b == b'\\' && q == b'"' {
                    i += 2;
                    continue;
                }
                if b == q {
                    if q == b'\'' && next == Some(b'\'') {
                        i += 2;
                        continue;
                    }
                    quote = None;
                    prev = Some(b);
                }
                i += 1;
                continue;
            }
            let token_start = matches!(prev, None | Some(b' ' | b'\t' | b'[' | b'{' | b',' | b':'));
            match b {
                b'#' if matches!(prev, None | Some(b' ' | b'\t')) => break,
                b'\'' | b'"' if token_start => quote = Some(b),
                b'[' | b'{' => flow += 1,
                b']' | b'}' => flow = flow.saturating_sub(1),
                b'-' | b'?' | b':'
                    if flow == 0 && matches!(next, None | Some(b' ' | b'\t' | b'\r')) =>
                {
                    compact += 1
                }
                _ => {}
            }
            if !b.is_ascii_whitespace() {
                last = Some(b);
            }
            prev = Some(b);
            let depth = indents.len() + compact + flow;
            if depth > MAX_DEPTH {
                return Some((depth, number + 1));
            }
            i += 1;
        }
        // `key: |`, `- >-`: the following, more indented lines are text.
        let header = line[..i.min(line.len())].trim_end();
        let header = header.trim_end_matches(|c: char| c.is_ascii_digit() || c == '-' || c == '+');
        if quote.is_none()
            && flow == 0
            && last.is_some()
            && (header.ends_with('|') || header.ends_with('>'))
        {
            block_scalar = Some(indent);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deep_flow_nesting_is_refused_at_once_naming_the_limit() {
        let n = 100_000;
        let doc = format!(
            "architecture: mlp\nmembers: {}{}\n",
            "[".repeat(n),
            "]".repeat(n)
        );
        let started = std::time::Instant::now();
        let e = crate::RunSpecFile::from_yaml(&doc).unwrap_err();
        // Before the pre-scan this took 37 s of CPU; the scan takes microseconds.
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        assert!(e.to_string().contains("1024"), "{e}");
        let shallow = format!("a: {}{}\n", "[".repeat(100), "]".repeat(100));
        let e = check_yaml(&shallow).unwrap_err();
        assert!(e.to_string().contains("more than 64 levels"), "{e}");
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn deep_block_nesting_is_refused() {
        let compact = format!("a:\n  {}x\n", "- ".repeat(80));
        assert!(check_yaml(&compact)
            .unwrap_err()
            .to_string()
            .contains("64 levels"));
        let indented: String = (0..80)
            .map(|i| format!("{}k{i}:\n", " ".repeat(i)))
            .collect();
        assert!(check_yaml(&indented)
            .unwrap_err()
            .to_string()
            .contains("line 64"));
    }

    #[test]
    fn real_specs_pass_and_quotes_comments_and_text_do_not_count() {
        for path in [
            "fashion-mlp",
            "fashion-lenet",
            "cifar10-resnet18",
            "fuse-existing",
            "image-folder",
            "nightly",
        ] {
            let file = format!("{}/../examples/{path}.yaml", env!("CARGO_MANIFEST_DIR"));
            let text = std::fs::read_to_string(&file).unwrap();
            check_yaml(&text).unwrap();
        }
        let brackets = "[".repeat(100);
        check_yaml(&format!(
            "name: '{brackets}'\nlabels: {{a: \"{brackets}\"}}\n"
        ))
        .unwrap();
        check_yaml(&format!("# {brackets}\nname: x # {brackets}\n")).unwrap();
        check_yaml(&format!("name: |\n  {brackets}\n  - - - -\nlabels: {{}}\n")).unwrap();
        check_yaml("name: 'it''s [' # it's\nlabels: {a: \"\\\" [\"}\n").unwrap();
    }
}
