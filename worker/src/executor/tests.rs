use fusion::arch::{preset, Architecture};
use nt_common::StorageArgs;
use nt_spec::{SyntheticSpec, TaskWork, TrainConfig};
use tokio::sync::mpsc;

use super::*;

#[test]
fn a_cpu_run_stays_on_the_cpu_of_a_gpu_worker() {
    let gpu = Device::Cuda(0);
    assert_eq!(task_device(nt_spec::Device::Cpu, gpu), Device::Cpu);
    assert_eq!(task_device(nt_spec::Device::Gpu, gpu), gpu);
    assert_eq!(task_device(nt_spec::Device::Any, gpu), gpu);
    assert_eq!(task_device(nt_spec::Device::Any, Device::Cpu), Device::Cpu);
}

#[test]
fn epoch_states_go_where_the_layout_says() {
    let prefix = layout::attempt_prefix("run-1", "member-0", 2);
    assert_eq!(
        job::epoch_state_key(&prefix, 7),
        layout::epoch_state(&prefix, 7)
    );
}

/// A task of run `run-1` on synthetic data, attempt 1.
fn plan(work: TaskWork, job: Job) -> TaskPlan {
    let arch =
        Architecture::new(preset("mlp:input=1x8x8,hidden=16,depth=1,classes=4").unwrap()).unwrap();
    TaskPlan {
        task_id: format!("run-1/{}", work.local_name()),
        run_id: "run-1".into(),
        attempt: 1,
        label: work.label(),
        arch,
        data: DataSpec {
            synthetic: Some(SyntheticSpec {
                train: 256,
                test: 64,
                classes: 4,
                shape: [1, 8, 8],
                seed: 3,
                noise: 0.5,
            }),
            ..DataSpec::named("synthetic")
        },
        job,
        device: nt_spec::Device::Cpu,
        eval_batch: 50,
        output_prefix: layout::attempt_prefix("run-1", &work.local_name(), 1),
        resume_state: None,
    }
}

fn config(seed: u64) -> TrainConfig {
    TrainConfig {
        epochs: 2,
        batch_size: 32,
        seed,
        ..TrainConfig::default()
    }
}

/// Runs `task` as the lease loop does, on a blocking thread; returns its
/// result and the checkpoints it announced.
fn run(
    env: &Env,
    task: &pb::Task,
    control: &TaskControl,
) -> (Result<pb::TaskResult, TaskError>, Vec<(String, u32)>) {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let result = execute(task, env, &tx, control);
    let mut checkpoints = Vec::new();
    while let Ok(m) = rx.try_recv() {
        checkpoints.extend(m.checkpoint);
    }
    (result, checkpoints)
}

#[test]
fn tasks_train_fine_tune_and_evaluate_over_the_store() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let storage = Storage::open(&StorageArgs {
        url: "memory://".into(),
        ..StorageArgs::local(std::path::Path::new("/"))
    })
    .unwrap();
    let env = Env {
        storage,
        runtime: runtime.handle().clone(),
        device: Device::Cpu,
        threads: Some(1),
        data_dirs: resolve_data_dirs(&[nt_spec::defaults::DATASETS_DIR.into()]),
    };
    let read = |key: &str| {
        let bytes = StoreIo(&env).read(key).unwrap();
        fusion::checkpoint::load_bytes(key, bytes).unwrap()
    };
    let control = TaskControl::default();

    // Training: the model and every epoch state under the attempt's prefix.
    let member = plan(
        TaskWork::Train { member: 0 },
        Job::Train { config: config(7) },
    );
    let (result, checkpoints) = run(&env, &member.to_wire(), &control);
    let result = result.unwrap();
    assert_eq!(
        result.checkpoint,
        layout::attempt_model(&member.output_prefix)
    );
    assert_eq!(
        checkpoints,
        [1, 2].map(|e| (layout::epoch_state(&member.output_prefix, e), e as u32))
    );
    assert_eq!(result.curve.len(), 2);
    assert!(result.before.is_none());
    let after = result.after.unwrap();
    assert_eq!(after.name, "member 0");
    assert_eq!(after.parameters, member.arch.parameter_count() as u64);
    assert_eq!(after.checkpoint, result.checkpoint);
    let lineage = read(&result.checkpoint).lineage().unwrap();
    assert_eq!(lineage.method, "trained");
    assert_eq!(lineage.run.as_deref(), Some("run-1"));
    assert_eq!(
        lineage.metrics.keys().collect::<Vec<_>>(),
        ["test_accuracy"]
    );
    assert_eq!(lineage.metrics["test_accuracy"], after.accuracy);
    assert_eq!(lineage.notes.len(), 1);
    assert_eq!(lineage.notes["seed"], "7");

    // Fine-tuning: evaluated before, names its initial checkpoint.
    let fine = plan(
        TaskWork::FineTune {
            method: fusion::Method::Nt,
            distilled: false,
        },
        Job::FineTune {
            config: config(1000),
            init: result.checkpoint.clone(),
            teachers: vec![result.checkpoint.clone()],
        },
    );
    let tuned = run(&env, &fine.to_wire(), &control).0.unwrap();
    let before = tuned.before.unwrap();
    assert_eq!(before.checkpoint, result.checkpoint);
    assert_eq!(before.accuracy, after.accuracy);
    let lineage = read(&tuned.checkpoint).lineage().unwrap();
    assert_eq!(lineage.method, "fine-tuned");
    assert_eq!(lineage.members, std::slice::from_ref(&result.checkpoint));

    // Evaluation: a model and an ensemble of two, with their parameters.
    let items = vec![
        EvalItem {
            name: "member 0".into(),
            checkpoints: vec![result.checkpoint.clone()],
        },
        EvalItem {
            name: "ensemble".into(),
            checkpoints: vec![result.checkpoint.clone(), tuned.checkpoint.clone()],
        },
    ];
    let eval = plan(TaskWork::Evaluate, Job::Evaluate { items });
    let evaluated = run(&env, &eval.to_wire(), &control).0.unwrap();
    assert_eq!(evaluated.evaluations.len(), 2);
    assert_eq!(evaluated.evaluations[0].accuracy, after.accuracy);
    assert_eq!(evaluated.evaluations[1].name, "ensemble");
    assert_eq!(
        evaluated.evaluations[1].parameters,
        2 * member.arch.parameter_count() as u64
    );
    assert_eq!(evaluated.evaluations[1].checkpoint, result.checkpoint);

    // A missing checkpoint is the task's fault; a stop is a stop.
    let missing = plan(
        TaskWork::FineTune {
            method: fusion::Method::Average,
            distilled: false,
        },
        Job::FineTune {
            config: config(1000),
            init: "runs/run-1/fused/nope.safetensors".into(),
            teachers: Vec::new(),
        },
    );
    let err = run(&env, &missing.to_wire(), &control).0.unwrap_err();
    assert!(
        matches!(&err, TaskError::Fatal(m) if m == "object `runs/run-1/fused/nope.safetensors` does not exist"),
        "{err:?}"
    );
    control.stop(StopReason::Cancelled);
    let err = run(&env, &member.to_wire(), &control).0.unwrap_err();
    assert!(
        matches!(err, TaskError::Stopped(StopReason::Cancelled)),
        "{err:?}"
    );
}

#[test]
fn local_data_is_read_only_within_the_data_folders() {
    let root = tempfile::tempdir().unwrap();
    let allowed = root.path().join("datasets");
    std::fs::create_dir_all(allowed.join("mine")).unwrap();
    let outside = root.path().join("secrets");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("train-images-idx3-ubyte"), "TOP SECRET").unwrap();
    std::os::unix::fs::symlink(&outside, allowed.join("link")).unwrap();
    std::fs::write(allowed.join("file"), "x").unwrap();
    let dirs = resolve_data_dirs(&[allowed.clone(), root.path().join("gone")]);
    assert_eq!(dirs.len(), 1, "a missing --data-dir is left out");

    let inside = allowed.join("mine");
    assert_eq!(
        allowed_data_dir(inside.to_str().unwrap(), &dirs).unwrap(),
        std::fs::canonicalize(&inside).unwrap()
    );
    let refused = |dir: std::path::PathBuf| {
        let e = allowed_data_dir(dir.to_str().unwrap(), &dirs).unwrap_err();
        assert!(!e.is_retryable());
        e.to_string()
    };
    let traversal = refused(allowed.join("mine/../../secrets"));
    assert!(
        traversal.contains("not a folder within this worker's data folders"),
        "{traversal}"
    );
    assert!(!traversal.contains("TOP SECRET"));
    // A symlink out, a file, a folder that does not exist: the same answer.
    for dir in [
        allowed.join("link"),
        allowed.join("file"),
        allowed.join("nope"),
    ] {
        let e = refused(dir.clone());
        assert_eq!(
            e.replace(dir.to_str().unwrap(), "<dir>"),
            traversal.replace(
                allowed.join("mine/../../secrets").to_str().unwrap(),
                "<dir>"
            )
        );
    }
    let e = refused("/etc".into());
    assert!(
        e.contains(allowed.canonicalize().unwrap().to_str().unwrap()),
        "{e}"
    );
}

/// Member `m`'s task (seed `7 + m`) at `attempt`.
fn member_plan(m: usize, attempt: u32) -> TaskPlan {
    let work = TaskWork::Train { member: m };
    TaskPlan {
        attempt,
        output_prefix: layout::attempt_prefix("run-1", &work.local_name(), attempt),
        ..plan(
            work,
            Job::Train {
                config: config(7 + m as u64),
            },
        )
    }
}

#[test]
fn a_joint_task_trains_each_part_as_it_would_train_alone() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let storage = Storage::open(&StorageArgs {
        url: "memory://".into(),
        ..StorageArgs::local(std::path::Path::new("/"))
    })
    .unwrap();
    let env = Env {
        storage,
        runtime: runtime.handle().clone(),
        device: Device::Cpu,
        threads: Some(1),
        data_dirs: resolve_data_dirs(&[]),
    };
    let read = |key: &str| {
        let bytes = StoreIo(&env).read(key).unwrap();
        fusion::checkpoint::load_bytes(key, bytes).unwrap()
    };
    let control = TaskControl::default();
    let alone: Vec<pb::TaskResult> = (0..2)
        .map(|m| run(&env, &member_plan(m, 1).to_wire(), &control).0.unwrap())
        .collect();

    let parts: Vec<TaskPlan> = (0..2).map(|m| member_plan(m, 2)).collect();
    let joint = TaskPlan {
        attempt: 2,
        output_prefix: layout::attempt_prefix("run-1", "members-joint", 2),
        ..plan(
            TaskWork::Joint {
                phase: nt_spec::JointPhase::Members,
                models: 2,
            },
            Job::Joint {
                parts: parts.clone(),
            },
        )
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let result = execute(&joint.to_wire(), &env, &tx, &control).unwrap();
    let mut messages = Vec::new();
    while let Ok(m) = rx.try_recv() {
        messages.push(m);
    }
    // Epoch states are the joint task's; progress and epochs name their part.
    let states: Vec<_> = messages
        .iter()
        .filter_map(|m| m.checkpoint.clone())
        .collect();
    assert_eq!(
        states,
        [1, 2].map(|e| (layout::epoch_state(&joint.output_prefix, e), e as u32))
    );
    assert!(messages
        .iter()
        .all(|m| m.checkpoint.is_some() == m.part.is_none()));
    for part in 0..2 {
        let epochs = messages
            .iter()
            .filter(|m| m.part == Some(part) && m.epoch.is_some())
            .count();
        assert_eq!(epochs, 2, "part {part}");
    }
    // One result per part, each as the part's task alone would give it
    // (the CPU trains each member with its own kernels, bit for bit).
    assert_eq!(result.parts.len(), 2);
    assert!(result.checkpoint.is_empty() && result.after.is_none());
    let share = result.compute_seconds / 2.0;
    for (m, (part, alone)) in result.parts.iter().zip(&alone).enumerate() {
        assert_eq!(
            part.checkpoint,
            layout::attempt_model(&parts[m].output_prefix)
        );
        assert_eq!(part.compute_seconds, share);
        let after = part.after.as_ref().unwrap();
        assert_eq!(after.name, format!("member {m}"));
        assert_eq!(after.accuracy, alone.after.as_ref().unwrap().accuracy);
        let losses = |r: &pb::TaskResult| r.curve.iter().map(|p| p.train_loss).collect::<Vec<_>>();
        let (jointly, apart) = (read(&part.checkpoint), read(&alone.checkpoint));
        assert_eq!(
            jointly.tensors.keys().collect::<Vec<_>>(),
            apart.tensors.keys().collect::<Vec<_>>()
        );
        for (name, t) in &jointly.tensors {
            assert_eq!(t.bytes(), apart.tensors[name].bytes(), "member {m}: {name}");
        }
        // The mean losses are summed in another order: equal to 1e-6.
        for (j, a) in losses(part).into_iter().zip(losses(alone)) {
            assert!((j - a).abs() <= 1e-6 * a.abs(), "member {m}: {j} vs {a}");
        }
        let lineage = jointly.lineage().unwrap();
        assert_eq!(lineage.notes["seed"], (7 + m).to_string());
    }

    // Models joint training refuses are a split, not a failure.
    let mut refused = joint.clone();
    let mut arch = refused.arch.spec().clone();
    let last = arch.nodes.len() - 1;
    arch.nodes.insert(
        last,
        fusion::arch::NodeSpec {
            name: Some("drop".into()),
            input: vec![],
            op: fusion::arch::Op::Dropout { p: 0.5 },
        },
    );
    let arch = Architecture::new(arch).unwrap();
    let Job::Joint { parts } = &mut refused.job else {
        unreachable!()
    };
    for part in parts.iter_mut() {
        part.arch = arch.clone();
    }
    refused.arch = arch;
    let err = run(&env, &refused.to_wire(), &control).0.unwrap_err();
    assert!(
        matches!(&err, TaskError::NotJoint(m) if m.contains("dropout")),
        "{err:?}"
    );
}
