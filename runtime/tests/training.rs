//! The trainer on synthetic data and on a Fashion-MNIST subset.

#![allow(clippy::unwrap_used)]

use fusion::arch::{preset, Architecture};
use fusion::state::StateDict;
use nt_runtime::data::{self, normalization, DataSpec, DeviceSet, SyntheticSpec};
use nt_runtime::model::Network;
use nt_runtime::train::{
    evaluate, evaluate_ensemble, init_network, train, Control, Distill, NoHooks, Progress, Sgd,
    SgdConfig, TrainConfig, TrainHooks, TrainState,
};
use nt_runtime::TchExt;
use tch::{Device, Kind, Tensor};

/// The tests reseed libtorch's global generator: run them one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn synthetic(shape: [usize; 3]) -> (DeviceSet, DeviceSet) {
    let spec = DataSpec {
        synthetic: Some(SyntheticSpec {
            train: 512,
            test: 256,
            classes: 4,
            shape,
            seed: 5,
            noise: 0.8,
        }),
        ..DataSpec::named("synthetic")
    };
    let splits = data::load_local(&spec).unwrap();
    let norm = normalization(&splits.train);
    (
        DeviceSet::new(&splits.train, &norm, Device::Cpu).unwrap(),
        DeviceSet::new(&splits.test, &norm, Device::Cpu).unwrap(),
    )
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
        ..TrainConfig::default()
    }
}

fn same(a: &StateDict, b: &StateDict) -> bool {
    a.tensors.len() == b.tensors.len()
        && a.tensors
            .iter()
            .all(|(n, t)| b.get(n).is_some_and(|u| u.bytes() == t.bytes()))
}

#[test]
fn loss_falls_and_a_seeded_cpu_run_is_reproducible_bit_for_bit() {
    let _serial = serial();
    let (tr, te) = synthetic([1, 8, 8]);
    let arch = mlp();
    let run = || {
        let mut net = init_network(&arch, Device::Cpu, 3).unwrap();
        let out = train(
            &mut net,
            &config(4),
            &tr,
            Some(&te),
            &[],
            None,
            &mut NoHooks,
        )
        .unwrap();
        (net.to_state().unwrap(), out)
    };
    let (a, out) = run();
    let (b, _) = run();
    assert!(same(&a, &b), "two seeded runs differ");
    let first = &out.history[0];
    let last = out.history.last().unwrap();
    assert!(
        last.train_loss < 0.5 * first.train_loss,
        "{first:?} -> {last:?}"
    );
    assert!(last.eval.unwrap().accuracy > 0.9, "{last:?}");
    // A different seed gives a different model.
    let mut other = init_network(&arch, Device::Cpu, 3).unwrap();
    let cfg = TrainConfig {
        seed: 12,
        ..config(4)
    };
    train(&mut other, &cfg, &tr, None, &[], None, &mut NoHooks).unwrap();
    assert!(!same(&a, &other.to_state().unwrap()));
}

/// Keeps the state after a chosen epoch.
struct Keep {
    at: usize,
    state: Option<TrainState>,
}

impl TrainHooks for Keep {
    fn epoch_end(
        &mut self,
        epoch: usize,
        state: &dyn Fn() -> nt_runtime::Result<TrainState>,
    ) -> nt_runtime::Result<()> {
        if epoch == self.at {
            self.state = Some(state()?);
        }
        Ok(())
    }
}

#[test]
fn resuming_from_an_epoch_checkpoint_equals_an_uninterrupted_run() {
    let _serial = serial();
    let (tr, te) = synthetic([1, 8, 8]);
    // Dropout, augmentation, weight decay and Nesterov all draw on the seeded state.
    let mut spec = preset("mlp:input=1x8x8,hidden=32,depth=2,classes=4").unwrap();
    spec.nodes.insert(
        2,
        fusion::arch::NodeSpec {
            name: None,
            input: vec![],
            op: fusion::arch::Op::Dropout { p: 0.2 },
        },
    );
    let arch = Architecture::new(spec).unwrap();
    let cfg = TrainConfig {
        weight_decay: 1e-3,
        nesterov: true,
        augment: data::Augment {
            crop_padding: 1,
            hflip: true,
        },
        schedule: nt_runtime::train::Schedule::Cosine { min_lr: 0.0 },
        ..config(4)
    };
    let mut whole = init_network(&arch, Device::Cpu, 1).unwrap();
    let mut keep = Keep { at: 2, state: None };
    let full = train(&mut whole, &cfg, &tr, Some(&te), &[], None, &mut keep).unwrap();

    // Round-trip the checkpoint through bytes, as a worker would.
    let state = keep.state.unwrap();
    let bytes = nt_runtime::train::train_state_to_bytes(&state).unwrap();
    let state = nt_runtime::train::train_state_from_bytes("resume", bytes).unwrap();
    assert_eq!(state.epoch, 2);

    let mut resumed = init_network(&arch, Device::Cpu, 99).unwrap();
    let rest = train(
        &mut resumed,
        &cfg,
        &tr,
        Some(&te),
        &[],
        Some(state),
        &mut NoHooks,
    )
    .unwrap();
    assert!(same(
        &whole.to_state().unwrap(),
        &resumed.to_state().unwrap()
    ));
    assert_eq!(rest.history.len(), 4);
    assert_eq!(rest.history[3].train_loss, full.history[3].train_loss);
}

#[test]
fn batch_norm_statistics_update_in_training_and_not_in_evaluation() {
    let _serial = serial();
    let (tr, te) = synthetic([3, 8, 8]);
    let arch =
        Architecture::new(preset("resnet:blocks=1,width=4,size=8,classes=4").unwrap()).unwrap();
    let mut net = init_network(&arch, Device::Cpu, 0).unwrap();
    let before = net.to_state().unwrap();
    evaluate(&net, &te, 64).unwrap();
    assert!(
        same(&before, &net.to_state().unwrap()),
        "evaluation changed the model"
    );
    train(&mut net, &config(1), &tr, None, &[], None, &mut NoHooks).unwrap();
    let after = net.to_state().unwrap();
    let mean = |s: &StateDict| {
        s.get("bn1.running_mean")
            .unwrap()
            .as_f32()
            .unwrap()
            .to_vec()
    };
    assert_ne!(mean(&before), mean(&after));
    let tracked = after
        .get("bn1.num_batches_tracked")
        .unwrap()
        .as_i64()
        .unwrap()[0];
    assert_eq!(tracked, 512 / 32);
}

#[test]
fn the_ensemble_accuracy_comes_from_averaged_outputs() {
    let _serial = serial();
    let (tr, te) = synthetic([1, 8, 8]);
    let arch = mlp();
    let nets: Vec<Network> = (0..3)
        .map(|s| {
            let mut n = init_network(&arch, Device::Cpu, s).unwrap();
            train(
                &mut n,
                &TrainConfig {
                    seed: s,
                    ..config(1)
                },
                &tr,
                None,
                &[],
                None,
                &mut NoHooks,
            )
            .unwrap();
            n
        })
        .collect();
    let refs: Vec<&Network> = nets.iter().collect();
    let got = evaluate_ensemble(&refs, &te, 50).unwrap();
    let mean = refs
        .iter()
        .map(|n| n.predict(&te.x).unwrap())
        .reduce(|a, b| a + b)
        .unwrap()
        / 3.0;
    let want = mean
        .argmax(-1, false)
        .eq_tensor(&te.y)
        .to_kind(Kind::Float)
        .mean(Kind::Float);
    assert!((got.accuracy - want.double_value(&[])).abs() < 1e-9);
    // Averaging logits is not averaging accuracies.
    let single: Vec<f64> = refs
        .iter()
        .map(|n| evaluate(n, &te, 50).unwrap().accuracy)
        .collect();
    assert_eq!(got.samples, 256);
    assert!(single.iter().all(|a| (0.0..=1.0).contains(a)));
}

#[test]
fn sgd_follows_pytorch_semantics() {
    let _serial = serial();
    // Two parameters of different shapes, loss sum(p^2)/2 so grad = p; lr 0.1,
    // momentum 0.9, wd 0.01, nesterov. Each element follows the scalar recurrence.
    let a = Tensor::from_slice(&[1.0f32, -2.0]).set_requires_grad(true);
    let b = Tensor::from_slice(&[0.5f32, 3.0, -1.5, 4.0])
        .reshape([2, 2])
        .set_requires_grad(true);
    let config = SgdConfig {
        momentum: 0.9,
        weight_decay: 0.01,
        nesterov: true,
    };
    let mut sgd = Sgd::new(&[&a, &b], config).unwrap();
    // Taking the parameters over keeps their values and shapes.
    assert_eq!(Vec::<f32>::try_from(&a).unwrap(), [1.0, -2.0]);
    assert_eq!(b.size(), [2, 2]);
    let start = [1.0f64, -2.0, 0.5, 3.0, -1.5, 4.0];
    let (mut pv, mut buf) = (start, [0.0f64; 6]);
    for step in 0..3 {
        let loss = (&a * &a / 2.0).sum(Kind::Float) + (&b * &b / 2.0).sum(Kind::Float);
        let grads = Tensor::run_backward(&[&loss], &[&a, &b], false, false);
        sgd.step(&grads, 0.1).unwrap();
        for i in 0..6 {
            let d = pv[i] + 0.01 * pv[i];
            buf[i] = if step == 0 { d } else { 0.9 * buf[i] + d };
            pv[i] -= 0.1 * (d + 0.9 * buf[i]);
        }
        let got: Vec<f32> = Vec::try_from(&a).unwrap();
        let got_b: Vec<f32> = Vec::try_from(&b.reshape([-1])).unwrap();
        for (i, g) in got.iter().chain(&got_b).enumerate() {
            assert!((*g as f64 - pv[i]).abs() < 1e-5, "step {step} element {i}");
        }
    }
    // The momentum state round-trips, per parameter and by name.
    let names = vec!["a".to_string(), "b".to_string()];
    let state = sgd.state(&names).unwrap();
    assert_eq!(state.get("b").unwrap().shape(), [2, 2]);
    let mut again = Sgd::new(&[&a, &b], config).unwrap();
    again.load_state(&names, &state).unwrap();
    assert_eq!(
        again
            .state(&names)
            .unwrap()
            .get("b")
            .unwrap()
            .to_tch()
            .reshape([-1]),
        state.get("b").unwrap().to_tch().reshape([-1])
    );
    // A state holding some buffers but not all is refused, naming the missing one.
    let mut partial = StateDict::default();
    partial.insert("a".to_string(), state.get("a").unwrap().clone());
    let err = again.load_state(&names, &partial).unwrap_err().to_string();
    assert!(err.contains("`b` is missing"), "{err}");
}

#[test]
fn distillation_from_teachers_trains_and_progress_can_stop_a_run() {
    let _serial = serial();
    let (tr, te) = synthetic([1, 8, 8]);
    let arch = mlp();
    let mut teacher = init_network(&arch, Device::Cpu, 1).unwrap();
    train(&mut teacher, &config(3), &tr, None, &[], None, &mut NoHooks).unwrap();
    let mut student = init_network(&arch, Device::Cpu, 2).unwrap();
    let cfg = TrainConfig {
        distill: Some(Distill::default()),
        ..config(2)
    };
    let out = train(
        &mut student,
        &cfg,
        &tr,
        Some(&te),
        &[teacher],
        None,
        &mut NoHooks,
    )
    .unwrap();
    assert!(
        out.history[1].eval.unwrap().accuracy > 0.8,
        "{:?}",
        out.history
    );

    struct StopAfter(usize, Vec<Progress>);
    impl TrainHooks for StopAfter {
        fn progress(&mut self, p: &Progress) -> Control {
            self.1.push(p.clone());
            if self.1.len() >= self.0 {
                Control::Stop
            } else {
                Control::Continue
            }
        }
    }
    let mut hooks = StopAfter(2, Vec::new());
    let cfg = TrainConfig {
        log_every: 4,
        ..config(5)
    };
    let mut net = init_network(&arch, Device::Cpu, 2).unwrap();
    let out = train(&mut net, &cfg, &tr, None, &[], None, &mut hooks).unwrap();
    assert!(out.stopped);
    assert_eq!(hooks.1.len(), 2);
    assert_eq!(hooks.1[1].step, 8);
    assert!(hooks.1[0].samples_per_second > 0.0);
}

#[test]
fn a_stop_is_honoured_between_steps_without_waiting_for_a_report() {
    let _serial = serial();
    let (tr, _) = synthetic([1, 8, 8]);
    let arch = Architecture::new(preset("mlp:input=1x8x8,hidden=16,depth=1").unwrap()).unwrap();
    /// Asks to stop once it has been asked `after` times; counts reports.
    struct StopBetweenSteps {
        after: usize,
        asked: std::cell::Cell<usize>,
        reports: usize,
    }
    impl TrainHooks for StopBetweenSteps {
        fn progress(&mut self, _: &Progress) -> Control {
            self.reports += 1;
            Control::Continue
        }
        fn stop_requested(&self) -> bool {
            self.asked.set(self.asked.get() + 1);
            self.asked.get() >= self.after
        }
    }
    let mut hooks = StopBetweenSteps {
        after: 3,
        asked: std::cell::Cell::new(0),
        reports: 0,
    };
    // Reports only every 1,000 steps: the stop cannot come from a report.
    let cfg = TrainConfig {
        log_every: 1000,
        batch_size: 32,
        ..config(5)
    };
    let mut net = init_network(&arch, Device::Cpu, 2).unwrap();
    let out = train(&mut net, &cfg, &tr, None, &[], None, &mut hooks).unwrap();
    assert!(out.stopped);
    assert_eq!(
        (hooks.asked.get(), hooks.reports),
        (3, 0),
        "stopped after the third step"
    );
}

#[test]
fn a_fashion_mnist_subset_is_learned() {
    let _serial = serial();
    let spec = DataSpec {
        train_subset: Some(6000),
        test_subset: Some(1000),
        ..DataSpec::fashion_mnist()
    };
    let splits = data::load_local(&spec).unwrap();
    let norm = normalization(&splits.train);
    let tr = DeviceSet::new(&splits.train, &norm, Device::Cpu).unwrap();
    let te = DeviceSet::new(&splits.test, &norm, Device::Cpu).unwrap();
    let arch = Architecture::new(preset("mlp:hidden=128,depth=2").unwrap()).unwrap();
    let mut net = init_network(&arch, Device::Cpu, 0).unwrap();
    let out = train(
        &mut net,
        &TrainConfig {
            epochs: 2,
            ..TrainConfig::default()
        },
        &tr,
        Some(&te),
        &[],
        None,
        &mut NoHooks,
    )
    .unwrap();
    let acc = out.history[1].eval.unwrap().accuracy;
    assert!(out.history[1].train_loss < out.history[0].train_loss);
    assert!(acc > 0.7, "accuracy {acc}");
}

#[test]
fn concurrent_trainings_in_one_process_stay_reproducible() {
    let _serial = serial();
    let (tr, te) = synthetic([1, 8, 8]);
    let arch = mlp();
    let cfg = TrainConfig {
        augment: data::Augment {
            crop_padding: 1,
            hflip: true,
        },
        ..config(2)
    };
    let alone = {
        let mut n = init_network(&arch, Device::Cpu, 4).unwrap();
        train(&mut n, &cfg, &tr, Some(&te), &[], None, &mut NoHooks).unwrap();
        n.to_state().unwrap()
    };
    // Two trainings on two threads at once, each with its own seed.
    let (a, _) = std::thread::scope(|s| {
        let one = s.spawn(|| {
            let (tr, _) = synthetic([1, 8, 8]);
            let mut n = init_network(&arch, Device::Cpu, 4).unwrap();
            train(&mut n, &cfg, &tr, None, &[], None, &mut NoHooks).unwrap();
            n.to_state().unwrap()
        });
        let two = s.spawn(|| {
            let (tr, _) = synthetic([1, 8, 8]);
            let mut n = init_network(&arch, Device::Cpu, 5).unwrap();
            let other = TrainConfig {
                seed: 77,
                ..cfg.clone()
            };
            train(&mut n, &other, &tr, None, &[], None, &mut NoHooks).unwrap();
            n.to_state().unwrap()
        });
        (one.join().unwrap(), two.join().unwrap())
    });
    assert!(same(&alone, &a), "a concurrent training changed the result");
}
