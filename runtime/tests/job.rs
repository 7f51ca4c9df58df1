//! The job driver on synthetic data: what it trains equals what the trainer
//! trains when called directly, bit for bit on the CPU; its lineage, epoch
//! states, resumption, stops and evaluations.

#![allow(clippy::unwrap_used)]

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};

use fusion::arch::{preset, Architecture};
use fusion::checkpoint;
use fusion::state::StateDict;
use nt_runtime::data::{self, DataSpec, FileSource, SyntheticSpec};
use nt_runtime::job::{
    run_evaluation, run_joint_training, run_training, ArchOf, EvalJob, JobHooks, JobIo, JointJob,
    LocalFiles, ModelRef, Normalize, Provenance, Quiet, Start, TrainJob,
};
use nt_runtime::model::Network;
use nt_runtime::train::{
    evaluate, evaluate_ensemble, init_network, train, EpochRecord, Evaluation, NoHooks, Progress,
    TrainConfig,
};
use nt_runtime::{Result, RuntimeError};
use nt_spec::EvalItem;
use tch::Device;

/// Training reseeds libtorch's global generator: one test at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn data_spec() -> DataSpec {
    DataSpec {
        synthetic: Some(SyntheticSpec {
            train: 512,
            test: 256,
            classes: 4,
            shape: [1, 8, 8],
            seed: 5,
            noise: 0.8,
        }),
        ..DataSpec::named("synthetic")
    }
}

fn mlp() -> Architecture {
    Architecture::new(preset("mlp:input=1x8x8,hidden=32,depth=2,classes=4").unwrap()).unwrap()
}

fn config(epochs: usize) -> TrainConfig {
    TrainConfig {
        epochs,
        batch_size: 32,
        lr: 0.05,
        seed: 11,
        log_every: 4,
        ..TrainConfig::default()
    }
}

fn job(start: Start, output: &str) -> TrainJob {
    TrainJob {
        start,
        teachers: Vec::new(),
        config: config(3),
        data: data_spec(),
        device: Device::Cpu,
        eval_batch: 1024,
        resume: None,
        epoch_states: None,
        output: output.into(),
        provenance: Provenance::Run {
            run: "run-1".into(),
        },
    }
}

fn same(a: &StateDict, b: &StateDict) -> bool {
    a.tensors.len() == b.tensors.len()
        && a.tensors
            .iter()
            .all(|(n, t)| b.get(n).is_some_and(|u| u.bytes() == t.bytes()))
}

/// A history without its timings.
fn figures(history: &[EpochRecord]) -> Vec<(usize, f64, f64, f64, Option<Evaluation>)> {
    history
        .iter()
        .map(|e| (e.epoch, e.lr, e.train_loss, e.train_accuracy, e.eval))
        .collect()
}

/// Objects in memory; counts reads, and fails writes under `broken`.
#[derive(Default)]
struct Memory {
    objects: RefCell<HashMap<String, Vec<u8>>>,
    reads: RefCell<HashMap<String, usize>>,
    broken: Option<&'static str>,
}

impl JobIo for Memory {
    fn read(&self, key: &str) -> Result<Vec<u8>> {
        *self.reads.borrow_mut().entry(key.into()).or_default() += 1;
        self.objects
            .borrow()
            .get(key)
            .cloned()
            .ok_or_else(|| RuntimeError::Missing(key.into()))
    }

    fn write(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        if self.broken.is_some_and(|b| key.starts_with(b)) {
            return Err(RuntimeError::Storage(format!("writing `{key}`: refused")));
        }
        self.objects.borrow_mut().insert(key.into(), bytes);
        Ok(())
    }

    fn data_source(&self, spec: &DataSpec) -> Result<Box<dyn FileSource + '_>> {
        Ok(Box::new(data::local_source(spec)?))
    }
}

impl Memory {
    fn state(&self, key: &str) -> StateDict {
        checkpoint::load_bytes(key, self.objects.borrow()[key].clone()).unwrap()
    }
}

#[test]
fn a_member_trained_through_the_driver_equals_one_trained_directly() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("m.safetensors").display().to_string();
    let states = dir.path().join("states").display().to_string();
    let mut through = job(Start::Fresh(mlp()), &output);
    through.epoch_states = Some(states.clone());
    through.provenance = Provenance::Offline {
        notes: BTreeMap::from([("data".to_string(), "synthetic".to_string())]),
    };
    let trained = run_training(&through, &LocalFiles, &mut Quiet).unwrap();

    let prepared = data::load_local(&data_spec())
        .unwrap()
        .to_device(Device::Cpu)
        .unwrap();
    let mut net = init_network(&mlp(), Device::Cpu, 11).unwrap();
    let direct = train(
        &mut net,
        &config(3),
        &prepared.train,
        Some(prepared.monitor()),
        &[],
        None,
        &mut NoHooks,
    )
    .unwrap();

    let saved = checkpoint::load(std::path::Path::new(&output)).unwrap();
    assert!(same(&saved, &net.to_state().unwrap()), "the models differ");
    assert_eq!(figures(&trained.outcome.history), figures(&direct.history));
    assert_eq!(trained.after, evaluate(&net, &prepared.test, 1024).unwrap());
    assert_eq!(trained.before, None);
    assert_eq!(trained.key, output);
    assert_eq!(saved.input().unwrap().mean, prepared.normalization.mean);
    let lineage = saved.lineage().unwrap();
    assert_eq!(lineage.method, "trained");
    assert!(lineage.members.is_empty() && lineage.run.is_none());
    assert_eq!(lineage.metrics["test_accuracy"], trained.after.accuracy);
    assert_eq!(lineage.metrics["test_loss"], trained.after.loss);
    assert_eq!(lineage.notes["seed"], "11");
    assert_eq!(lineage.notes["data"], "synthetic");
    for epoch in 1..=3 {
        let state =
            std::path::Path::new(&states).join(format!("epoch-{epoch:04}.state.safetensors"));
        assert!(state.is_file(), "{}", state.display());
    }
}

#[test]
fn a_resumed_training_equals_an_uninterrupted_one() {
    let _serial = serial();
    let io = Memory::default();
    let mut whole = job(Start::Fresh(mlp()), "whole/model.safetensors");
    whole.epoch_states = Some("whole".into());
    let uninterrupted = run_training(&whole, &io, &mut Quiet).unwrap();

    let mut resumed = job(Start::Fresh(mlp()), "resumed/model.safetensors");
    resumed.resume = Some("whole/epoch-0001.state.safetensors".into());
    let again = run_training(&resumed, &io, &mut Quiet).unwrap();
    assert!(same(
        &io.state("whole/model.safetensors"),
        &io.state("resumed/model.safetensors")
    ));
    assert_eq!(
        figures(&again.outcome.history),
        figures(&uninterrupted.outcome.history)
    );
    // A run's model records the run and no test loss.
    let lineage = io.state("whole/model.safetensors").lineage().unwrap();
    assert_eq!(lineage.run.as_deref(), Some("run-1"));
    assert!(!lineage.metrics.contains_key("test_loss"));
}

#[test]
fn fine_tuning_starts_from_the_checkpoint_its_normalisation_and_teachers() {
    let _serial = serial();
    let io = Memory::default();
    run_training(&job(Start::Fresh(mlp()), "m0"), &io, &mut Quiet).unwrap();
    let mut other = job(Start::Fresh(mlp()), "m1");
    other.config.seed = 12;
    run_training(&other, &io, &mut Quiet).unwrap();

    let recorded = |key: &str| ModelRef {
        key: key.into(),
        arch: ArchOf::Recorded,
    };
    let mut fine = job(Start::Checkpoint(recorded("m0")), "ft");
    fine.teachers = vec![recorded("m0"), recorded("m1")];
    fine.config.distill = Some(nt_spec::Distill::default());
    // Data the model was not trained on: the model's normalisation still applies.
    fine.data.validation = 0.25;
    let tuned = run_training(&fine, &io, &mut Quiet).unwrap();

    let initial = io.state("m0");
    let prepared = data::load_local(&fine.data)
        .unwrap()
        .to_device_with(
            Device::Cpu,
            Some(data::Normalization::from(&initial.input().unwrap())),
        )
        .unwrap();
    let net = Network::from_state(&mlp(), &initial, Device::Cpu).unwrap();
    assert_eq!(
        tuned.before,
        Some(evaluate(&net, &prepared.test, 1024).unwrap())
    );
    let saved = io.state("ft");
    assert_eq!(saved.input(), initial.input());
    let lineage = saved.lineage().unwrap();
    assert_eq!(lineage.method, "fine-tuned");
    assert_eq!(lineage.members, ["m0"]);
}

/// Stops after `after` progress reports.
struct StopAfter {
    after: usize,
    seen: usize,
    saved: Vec<(usize, String)>,
}

impl JobHooks for StopAfter {
    fn progress(&mut self, _progress: &Progress) {
        self.seen += 1;
    }

    fn epoch_saved(&mut self, epoch: usize, key: &str) {
        self.saved.push((epoch, key.to_string()));
    }

    fn should_stop(&self) -> bool {
        self.seen >= self.after
    }
}

#[test]
fn hooks_stop_a_training_and_see_its_epoch_states() {
    let _serial = serial();
    let io = Memory::default();
    let mut stopped = job(Start::Fresh(mlp()), "out/model.safetensors");
    stopped.epoch_states = Some("out/".into());
    // 16 steps an epoch, a report every 4: the sixth report is in epoch 2.
    let mut hooks = StopAfter {
        after: 6,
        seen: 0,
        saved: Vec::new(),
    };
    let err = run_training(&stopped, &io, &mut hooks).unwrap_err();
    assert!(matches!(err, RuntimeError::Stopped), "{err}");
    assert_eq!(
        hooks.saved,
        [(1, "out/epoch-0001.state.safetensors".to_string())]
    );
    assert!(!io.objects.borrow().contains_key("out/model.safetensors"));
}

/// Goes on when an epoch state cannot be stored.
struct Tolerant(Vec<usize>);

impl JobHooks for Tolerant {
    fn epoch_save_failed(&mut self, epoch: usize, _error: RuntimeError) -> Result<()> {
        self.0.push(epoch);
        Ok(())
    }
}

#[test]
fn a_failed_epoch_state_ends_the_job_unless_the_hooks_go_on() {
    let _serial = serial();
    let io = Memory {
        broken: Some("states/"),
        ..Memory::default()
    };
    let mut j = job(Start::Fresh(mlp()), "model");
    j.config.epochs = 2;
    j.epoch_states = Some("states".into());
    let err = run_training(&j, &io, &mut Quiet).unwrap_err();
    assert!(
        err.is_retryable() && err.to_string().contains("states/epoch-0001"),
        "{err}"
    );
    let mut tolerant = Tolerant(Vec::new());
    run_training(&j, &io, &mut tolerant).unwrap();
    assert_eq!(tolerant.0, [1, 2]);
    assert!(io.objects.borrow().contains_key("model"));

    // A missing checkpoint is not worth another attempt; a bad one neither.
    let missing = job(
        Start::Checkpoint(ModelRef {
            key: "nope".into(),
            arch: ArchOf::Given(mlp()),
        }),
        "x",
    );
    let err = run_training(&missing, &io, &mut Quiet).unwrap_err();
    assert_eq!(err.to_string(), "object `nope` does not exist");
    assert!(!err.is_retryable());
    io.objects
        .borrow_mut()
        .insert("nope".into(), b"not a checkpoint".to_vec());
    let err = run_training(&missing, &io, &mut Quiet).unwrap_err();
    assert!(
        !err.is_retryable() && err.to_string().contains("nope"),
        "{err}"
    );
}

#[test]
fn evaluations_load_each_checkpoint_once_and_average_ensembles() {
    let _serial = serial();
    let io = Memory::default();
    run_training(&job(Start::Fresh(mlp()), "m0"), &io, &mut Quiet).unwrap();
    let mut other = job(Start::Fresh(mlp()), "m1");
    other.config.seed = 12;
    run_training(&other, &io, &mut Quiet).unwrap();
    io.reads.borrow_mut().clear();

    let item = |name: &str, keys: &[&str]| EvalItem {
        name: name.into(),
        checkpoints: keys.iter().map(|k| k.to_string()).collect(),
    };
    let eval = EvalJob {
        items: vec![
            item("member 0", &["m0"]),
            item("member 1", &["m1"]),
            item("ensemble", &["m0", "m1"]),
        ],
        arch: ArchOf::Given(mlp()),
        data: data_spec(),
        device: Device::Cpu,
        eval_batch: 100,
        normalize: Normalize::Recorded,
    };
    let got = run_evaluation(&eval, &io, &mut Quiet).unwrap();
    assert_eq!(io.reads.borrow()["m0"], 1);
    assert_eq!(io.reads.borrow()["m1"], 1);

    let prepared = data::load_local(&data_spec())
        .unwrap()
        .to_device(Device::Cpu)
        .unwrap();
    let net = |k: &str| Network::from_state(&mlp(), &io.state(k), Device::Cpu).unwrap();
    let (n0, n1) = (net("m0"), net("m1"));
    let names: Vec<&str> = got.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["member 0", "member 1", "ensemble"]);
    assert_eq!(
        got[0].evaluation,
        evaluate(&n0, &prepared.test, 100).unwrap()
    );
    assert_eq!(
        got[2].evaluation,
        evaluate_ensemble(&[&n0, &n1], &prepared.test, 100).unwrap()
    );
    assert_eq!(got[2].parameters, 2 * mlp().parameter_count());
    assert_eq!(got[2].arch, "mlp");

    // Asked to stop, it stops before the next model.
    let err = run_evaluation(
        &eval,
        &io,
        &mut StopAfter {
            after: 0,
            seen: 0,
            saved: Vec::new(),
        },
    )
    .unwrap_err();
    assert!(matches!(err, RuntimeError::Stopped), "{err}");
}

/// Counts each part's progress reports; stops after `after` reports in all.
#[derive(Default)]
struct PerPart {
    reports: BTreeMap<usize, usize>,
    after: Option<usize>,
    saved: Vec<(usize, String)>,
}

impl JobHooks for PerPart {
    fn part_progress(&mut self, part: usize, _progress: &Progress) {
        *self.reports.entry(part).or_default() += 1;
    }

    fn epoch_saved(&mut self, epoch: usize, key: &str) {
        self.saved.push((epoch, key.to_string()));
    }

    fn should_stop(&self) -> bool {
        self.after
            .is_some_and(|a| self.reports.values().sum::<usize>() >= a)
    }
}

fn joint_of(parts: Vec<TrainJob>, states: &str) -> JointJob {
    JointJob {
        parts,
        resume: None,
        epoch_states: Some(states.into()),
    }
}

#[test]
fn a_joint_job_stores_what_separate_jobs_store_bit_for_bit() {
    let _serial = serial();
    let io = Memory::default();
    let part = |seed: u64, out: &str| {
        let mut j = job(Start::Fresh(mlp()), out);
        j.config.seed = seed;
        j
    };
    let mut hooks = PerPart::default();
    let joint = joint_of(vec![part(11, "j0"), part(12, "j1")], "joint");
    let trained = run_joint_training(&joint, &io, &mut hooks).unwrap();
    for (k, seed) in [11u64, 12].into_iter().enumerate() {
        let alone = run_training(&part(seed, &format!("s{k}")), &io, &mut Quiet).unwrap();
        assert!(same(
            &io.state(&format!("j{k}")),
            &io.state(&format!("s{k}"))
        ));
        assert_eq!(trained[k].after, alone.after);
        assert_eq!(trained[k].key, format!("j{k}"));
        let lineage = io.state(&format!("j{k}")).lineage().unwrap();
        assert_eq!(lineage.notes["seed"], seed.to_string());
        assert_eq!(lineage.run.as_deref(), Some("run-1"));
        // 16 steps an epoch, a report every 4: 4 an epoch, per part.
        assert_eq!(hooks.reports[&k], 12);
        assert_eq!(trained[k].outcome.history.len(), 3);
    }
    let keys: Vec<_> = hooks.saved.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(
        keys,
        (1..=3)
            .map(|e| format!("joint/epoch-{e:04}.state.safetensors"))
            .collect::<Vec<_>>()
    );
    let states = nt_runtime::train::joint_state_from_bytes(
        "state",
        io.read("joint/epoch-0003.state.safetensors").unwrap(),
    )
    .unwrap();
    assert_eq!(states.len(), 2);
    assert!(states.iter().all(|s| s.epoch == 3));
}

#[test]
fn a_stopped_joint_job_resumes_from_its_last_epoch_state() {
    let _serial = serial();
    let io = Memory::default();
    let parts = |prefix: &str| {
        (0..2)
            .map(|k| {
                let mut j = job(Start::Fresh(mlp()), &format!("{prefix}/m{k}"));
                j.config.seed = 20 + k as u64;
                j
            })
            .collect::<Vec<_>>()
    };
    run_joint_training(&joint_of(parts("whole"), "whole"), &io, &mut Quiet).unwrap();
    // Two parts, 4 reports an epoch each: the 10th report is in epoch 2.
    let mut hooks = PerPart {
        after: Some(10),
        ..PerPart::default()
    };
    let err = run_joint_training(&joint_of(parts("cut"), "cut"), &io, &mut hooks).unwrap_err();
    assert!(matches!(err, RuntimeError::Stopped), "{err}");
    assert_eq!(hooks.saved.len(), 1);
    assert!(!io.objects.borrow().contains_key("cut/m0"));
    let mut resumed = joint_of(parts("cut"), "cut");
    resumed.resume = Some(hooks.saved[0].1.clone());
    let again = run_joint_training(&resumed, &io, &mut Quiet).unwrap();
    for (k, part) in again.iter().enumerate() {
        assert!(same(
            &io.state(&format!("whole/m{k}")),
            &io.state(&format!("cut/m{k}"))
        ));
        assert_eq!(part.outcome.history.len(), 3);
    }
}

#[test]
fn joint_fine_tunings_equal_separate_ones_with_and_without_distillation() {
    let _serial = serial();
    let io = Memory::default();
    for (k, seed) in [(0, 11u64), (1, 12)] {
        let mut j = job(Start::Fresh(mlp()), &format!("m{k}"));
        j.config.seed = seed;
        run_training(&j, &io, &mut Quiet).unwrap();
    }
    let recorded = |key: &str| ModelRef {
        key: key.into(),
        arch: ArchOf::Recorded,
    };
    let fine = |init: &str, distill: bool, out: &str| {
        let mut j = job(Start::Checkpoint(recorded(init)), out);
        j.config.epochs = 1;
        if distill {
            j.teachers = vec![recorded("m0"), recorded("m1")];
            j.config.distill = Some(nt_spec::Distill::default());
        }
        j
    };
    let joint = joint_of(
        vec![fine("m0", false, "jf0"), fine("m1", true, "jf1")],
        "ft-joint",
    );
    let tuned = run_joint_training(&joint, &io, &mut Quiet).unwrap();
    for (k, (init, distill)) in [("m0", false), ("m1", true)].into_iter().enumerate() {
        let alone = run_training(&fine(init, distill, &format!("sf{k}")), &io, &mut Quiet).unwrap();
        assert!(
            same(&io.state(&format!("jf{k}")), &io.state(&format!("sf{k}"))),
            "part {k}"
        );
        assert_eq!(tuned[k].before, alone.before);
        assert_eq!(
            io.state(&format!("jf{k}")).lineage().unwrap().members,
            [init]
        );
    }
}

#[test]
fn parts_that_cannot_train_as_one_are_refused_with_the_reason() {
    let _serial = serial();
    let io = Memory::default();
    let a = job(Start::Fresh(mlp()), "a");
    let mut b = job(Start::Fresh(mlp()), "b");
    b.data.validation = 0.5;
    let err = run_joint_training(&joint_of(vec![a.clone(), b], "x"), &io, &mut Quiet).unwrap_err();
    assert!(matches!(err, RuntimeError::NotJoint(_)), "{err}");
    assert!(err.to_string().contains("part 1"), "{err}");
    let mut c = a.clone();
    c.config.lr = 0.5;
    let err = run_joint_training(&joint_of(vec![a, c], "x"), &io, &mut Quiet).unwrap_err();
    assert!(err.to_string().contains("`lr`"), "{err}");
    assert!(io.objects.borrow().is_empty());
}
