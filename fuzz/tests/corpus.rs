//! Replays the whole corpus (seeds, found inputs, and every crash found so
//! far, which must now be refused cleanly) and runs a bounded number of
//! generated cases: mutations of the corpus and run specs with extreme values.

use nt_fuzz::mutate::{mutate, set_extreme, Rng};
use nt_fuzz::targets::validate_request;
use nt_fuzz::{corpus, Target};
use nt_proto::prost::Message;
use nt_proto::v1 as pb;
use proptest::prelude::*;

fn entries(target: Target) -> Vec<(String, Vec<u8>)> {
    corpus::load(&corpus::root(), target).expect("reading the corpus")
}

#[test]
fn every_corpus_input_runs_without_a_panic() {
    for target in Target::ALL {
        let inputs = entries(target);
        assert!(
            inputs.iter().any(|(name, _)| name.starts_with("seed-")),
            "{} has no seeds",
            target.name()
        );
        for (name, data) in &inputs {
            let outcome = std::panic::catch_unwind(|| target.run(data));
            assert!(outcome.is_ok(), "{}/{name} panics", target.name());
        }
    }
}

#[test]
fn seeds_are_accepted_where_they_are_valid() {
    let accepted = |target: Target, name: &str| {
        let (_, data) = entries(target)
            .into_iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no {name}"));
        target.run(&data)
    };
    for (target, name) in [
        (Target::Checkpoint, "seed-mlp_k2-with-arch.safetensors"),
        (Target::RunSpec, "seed-fashion-mlp.yaml"),
        (Target::ArchSpec, "seed-preset-01"),
        (Target::Request, "seed-fashion-mlp.pb"),
    ] {
        let outcome = accepted(target, name);
        assert!(outcome.accepted, "{name}: {}", outcome.signature);
    }
    let other = accepted(Target::Checkpoint, "seed-mlp_k2-other-arch.safetensors");
    assert!(
        other.signature.contains("records architecture"),
        "{other:?}"
    );
}

/// Stacked mutations of corpus entries, as `fuzz-drive` makes them, from a fixed seed.
#[test]
fn mutated_corpus_inputs_do_not_panic() {
    let cases_per_target = 3_000;
    for target in Target::ALL {
        let pool: Vec<Vec<u8>> = entries(target).into_iter().map(|(_, d)| d).collect();
        let mut rng = Rng::new(7);
        for _ in 0..cases_per_target {
            let mut data = rng.pick(&pool).clone();
            let other = rng.pick(&pool).clone();
            for _ in 0..1 + rng.below(4) {
                mutate(&mut rng, &mut data, &other, target.is_text(), 16 * 1024);
            }
            let run = std::panic::catch_unwind(|| target.run(&data));
            assert!(
                run.is_ok(),
                "{} panics on {:?}",
                target.name(),
                String::from_utf8_lossy(&data)
            );
        }
    }
}

fn base_spec() -> pb::RunSpec {
    let (_, data) = entries(Target::Request)
        .into_iter()
        .find(|(n, _)| n == "seed-fashion-mlp.pb")
        .expect("seed-fashion-mlp.pb");
    pb::SubmitRunRequest::decode(data.as_slice())
        .expect("a seed decodes")
        .spec
        .expect("with a spec")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, failure_persistence: None, ..ProptestConfig::default() })]

    /// A valid spec with up to four fields set to extremes (NaN, inf, 0,
    /// u64::MAX, 1 MB strings, traversals) is accepted or refused with a
    /// clear error; never a panic.
    #[test]
    fn specs_with_extreme_fields_are_refused_cleanly(edits in prop::collection::vec((any::<u32>(), any::<u64>()), 1..5)) {
        let mut spec = base_spec();
        for (field, pick) in edits {
            set_extreme(&mut spec, field, pick);
        }
        let _ = validate_request(&spec);
    }

    /// Arbitrary bytes as any target's input.
    #[test]
    fn arbitrary_bytes_are_refused_cleanly(data in prop::collection::vec(any::<u8>(), 0..512), which in 0usize..4) {
        let _ = Target::ALL[which].run(&data);
    }
}
