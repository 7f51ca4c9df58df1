//! Joint training against sequential training (issue 14): K members of one
//! architecture trained one after another with `train` (what nt does
//! without joint training) and together with `train_joint`, on the same
//! Fashion-MNIST subset, with the same batch size and number of steps.
//!
//! Each member trains one epoch on `steps * batch` samples, so every mode
//! takes `steps` SGD steps per member (lr 0.01, momentum 0.9, no weight
//! decay). The figure is the aggregate training rate: all members' samples
//! over the wall time of the training calls (models initialised and data on
//! the device beforehand; CUDA synchronised before the clock is read), after
//! one short warm-up run of every mode. Joint training's time includes its
//! setup and handing the members back (stacking and unstacking them on the
//! batched path), as a user pays it.
//!
//! Prints one JSON line per measurement; `bench/joint_bench.py` runs it for
//! several models and K and compares with PyTorch's vmap ensembling.
//!
//! `cargo build --release -p nt-bench --bin joint-bench &&
//!  target/release/joint-bench --arch lenet --k 4 --steps 20 [--device cuda]`

use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, ValueEnum};
use fusion::arch::Architecture;
use nt_runtime::data::{self, normalization, permutation, DataSpec, DeviceSet};
use nt_runtime::joint::{JointNetwork, Kernels};
use nt_runtime::model::{Network, Precision};
use nt_runtime::train::{init_network, train, train_joint, NoHooks, Sgd, SgdConfig, TrainConfig};
use tch::{Device, Kind, Reduction, Tensor};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum KernelChoice {
    /// Both kinds on the CPU, batched on CUDA.
    Auto,
    Batched,
    PerMember,
    Both,
}

#[derive(Parser)]
struct Args {
    /// Architecture preset (or a spec file).
    #[arg(long, default_value = "mlp")]
    arch: String,
    /// Ensemble members.
    #[arg(long, default_value_t = 4)]
    k: usize,
    /// Samples per step and member.
    #[arg(long, default_value_t = 256)]
    batch: usize,
    /// SGD steps per member.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Steps per member of the warm-up run of every mode.
    #[arg(long, default_value_t = 2)]
    warmup_steps: usize,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// The joint runs' kernels.
    #[arg(long, value_enum, default_value_t = KernelChoice::Auto)]
    kernels: KernelChoice,
    /// Skip the sequential baseline.
    #[arg(long)]
    no_sequential: bool,
    /// Measurements of every mode; the order of modes reverses every other repeat.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// Start with the reversed order (so a driver alternating processes can balance drift).
    #[arg(long)]
    reverse: bool,
    /// libtorch intra-op threads (default: libtorch's choice).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the resolved architecture spec as JSON and exit (the PyTorch
    /// side builds its module from it).
    #[arg(long)]
    print_arch: bool,
    /// Instead of timing whole trainings, time each phase of every step
    /// (gathering the batches, forward with the loss, backward, optimizer)
    /// through the runtime's public pieces, in the loops `train` and
    /// `train_joint` run; prints milliseconds per member-step.
    #[arg(long)]
    profile: bool,
}

/// One way of training the K members.
#[derive(Clone, Copy, Debug)]
enum Mode {
    Sequential,
    Joint(Kernels),
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Sequential => "sequential",
            Mode::Joint(_) => "joint",
        }
    }

    fn kernels(self) -> &'static str {
        match self {
            Mode::Sequential => "single",
            Mode::Joint(Kernels::Batched) => "batched",
            Mode::Joint(Kernels::PerMember) => "per-member",
        }
    }
}

/// What one run of a mode measured.
struct Measured {
    seconds: f64,
    /// The runtime's own rate: its epoch loops only (no stacking, no setup).
    inner_samples_per_second: f64,
    /// Mean over members of the epoch's training loss: a check that the
    /// modes did the same work (sequential and per-member joint agree to
    /// float rounding on the CPU, the same arithmetic).
    train_loss: f64,
    /// CPU time this process used over the wall time, in cores.
    own_cores: Option<f64>,
    /// CPU time other processes used meanwhile, in cores: a measurement
    /// taken while others compiled is slower for reasons of its own.
    foreign_cores: Option<f64>,
}

/// Busy CPU time of the whole machine and of this process, in clock ticks,
/// from /proc (Linux): what else ran during a measurement is the difference.
/// `None` where /proc cannot be read.
fn cpu_ticks() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let fields: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...: all but idle and iowait.
    let busy = fields.iter().sum::<u64>() - fields.get(3)? - fields.get(4)?;
    let own = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The fields after the command name (which may hold spaces), from `state`.
    let after = own
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .collect::<Vec<_>>();
    let utime: u64 = after.get(11)?.parse().ok()?;
    let stime: u64 = after.get(12)?.parse().ok()?;
    Some((busy, utime + stime))
}

/// Cores' worth of CPU time other processes used between two `cpu_ticks`
/// over `seconds` (clock ticks are 1/100 s on Linux).
fn foreign_cores(
    before: Option<(u64, u64)>,
    after: Option<(u64, u64)>,
    seconds: f64,
) -> Option<f64> {
    let ((b0, o0), (b1, o1)) = (before?, after?);
    let foreign = (b1 - b0) as f64 - (o1 - o0) as f64;
    Some((foreign / 100.0 / seconds).max(0.0))
}

fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

fn configs(k: usize, batch: usize) -> Vec<TrainConfig> {
    (0..k)
        .map(|m| TrainConfig {
            epochs: 1,
            batch_size: batch,
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 0.0,
            seed: m as u64,
            ..TrainConfig::default()
        })
        .collect()
}

/// Trains K fresh members on `set` (one epoch each) in `mode`.
fn run(
    mode: Mode,
    arch: &Architecture,
    k: usize,
    batch: usize,
    set: &DeviceSet,
) -> Result<Measured> {
    let device = set.device();
    let configs = configs(k, batch);
    let mut nets = (0..k)
        .map(|m| init_network(arch, device, 100 + m as u64))
        .collect::<nt_runtime::Result<Vec<_>>>()?;
    synchronize(device);
    let ticks = cpu_ticks();
    let start = Instant::now();
    let (inner_seconds, losses) = match mode {
        Mode::Sequential => {
            let mut seconds = 0.0;
            let mut losses = Vec::with_capacity(k);
            for (net, config) in nets.iter_mut().zip(&configs) {
                let out = train(net, config, set, None, &[], None, &mut NoHooks)?;
                seconds += set.len as f64 / out.samples_per_second;
                losses.push(out.history[0].train_loss);
            }
            (seconds, losses)
        }
        Mode::Joint(kernels) => {
            let (_, out) =
                train_joint(nets, kernels, &configs, set, None, &[], None, &mut NoHooks)?;
            let seconds = (k * set.len) as f64 / out.samples_per_second;
            let losses = out
                .members
                .iter()
                .map(|m| m.history[0].train_loss)
                .collect();
            (seconds, losses)
        }
    };
    synchronize(device);
    let seconds = start.elapsed().as_secs_f64();
    let after = cpu_ticks();
    Ok(Measured {
        seconds,
        inner_samples_per_second: (k * set.len) as f64 / inner_seconds,
        train_loss: losses.iter().sum::<f64>() / k as f64,
        own_cores: ticks
            .zip(after)
            .map(|((_, a), (_, b))| (b - a) as f64 / 100.0 / seconds),
        foreign_cores: foreign_cores(ticks, after, seconds),
    })
}

/// Seconds spent in each phase of the steps of one profiled run.
#[derive(Default)]
struct Phases {
    data: f64,
    forward: f64,
    backward: f64,
    optimizer: f64,
}

/// Adds the time since `*mark` to `slot` and moves the mark (after the
/// device has finished: phases on CUDA are otherwise asynchronous).
fn lap(device: Device, slot: &mut f64, mark: &mut Instant) {
    synchronize(device);
    let now = Instant::now();
    *slot += (now - *mark).as_secs_f64();
    *mark = now;
}

/// Forward with the loss, backward and SGD step of one network on a
/// gathered batch, as `train` (and per-member joint training) take them,
/// each phase timed.
fn timed_step(net: &Network, sgd: &mut Sgd, x: &Tensor, y: &Tensor, t: &mut Phases) -> Result<()> {
    let device = net.device();
    let mut mark = Instant::now();
    let logits = net.forward_with(x, true, Precision::F32)?;
    let loss = logits.f_cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0)?;
    lap(device, &mut t.forward, &mut mark);
    let grads = Tensor::f_run_backward(&[&loss], &net.trainable(), false, false)?;
    lap(device, &mut t.backward, &mut mark);
    sgd.step(&grads, 0.01)?;
    lap(device, &mut t.optimizer, &mut mark);
    Ok(())
}

/// One epoch of every member in `mode`, step by step as `train` and
/// `train_joint` take them (same gathers, losses, backward passes and SGD
/// steps; per-member joint training is each member's own network and
/// optimiser in turn, batched is one stacked network), each phase timed.
fn profile(
    mode: Mode,
    arch: &Architecture,
    k: usize,
    batch: usize,
    set: &DeviceSet,
) -> Result<Phases> {
    let device = set.device();
    let nets = (0..k)
        .map(|m| init_network(arch, device, 100 + m as u64))
        .collect::<nt_runtime::Result<Vec<_>>>()?;
    let orders = (0..k)
        .map(|m| {
            let order: Vec<i64> = permutation(set.len, m as u64)
                .into_iter()
                .map(|i| i as i64)
                .collect();
            Tensor::from_slice(&order).f_to_device(device)
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let sgd_config = SgdConfig {
        momentum: 0.9,
        weight_decay: 0.0,
        nesterov: false,
    };
    let steps = set.len.div_ceil(batch);
    let mut t = Phases::default();
    // Joint training's gather: every member's batch at once, [K*N, ...]
    // member by member.
    let order = Tensor::f_stack(&orders, 0)?;
    let gather = |step: usize, t: &mut Phases| -> Result<(Tensor, Tensor)> {
        let mut mark = Instant::now();
        let from = step * batch;
        let n = (set.len - from).min(batch) as i64;
        let idx = order.f_narrow(1, from as i64, n)?.f_reshape([-1])?;
        let x = set.x.f_index_select(0, &idx)?;
        let y = set.y.f_index_select(0, &idx)?.f_reshape([k as i64, n])?;
        lap(device, &mut t.data, &mut mark);
        Ok((x, y))
    };
    match mode {
        Mode::Sequential => {
            for (net, order) in nets.iter().zip(&orders) {
                let mut sgd = Sgd::new(&net.trainable(), sgd_config)?;
                let mut batches = set.batches(batch, Some(order));
                for _ in 0..steps {
                    let mut mark = Instant::now();
                    let (x, y) = batches.next().context("batches ended early")??;
                    lap(device, &mut t.data, &mut mark);
                    timed_step(net, &mut sgd, &x, &y, &mut t)?;
                }
            }
        }
        Mode::Joint(Kernels::PerMember) => {
            let mut sgds = nets
                .iter()
                .map(|net| Sgd::new(&net.trainable(), sgd_config))
                .collect::<nt_runtime::Result<Vec<_>>>()?;
            for step in 0..steps {
                let (x, y) = gather(step, &mut t)?;
                let xs = x.f_chunk(k as i64, 0)?;
                for (m, (net, sgd)) in nets.iter().zip(&mut sgds).enumerate() {
                    timed_step(net, sgd, &xs[m], &y.f_get(m as i64)?, &mut t)?;
                }
            }
        }
        Mode::Joint(Kernels::Batched) => {
            let joint = JointNetwork::stack(&nets)?.with_kernels(Kernels::Batched);
            let mut sgd = Sgd::new(&joint.trainable(), sgd_config)?;
            for step in 0..steps {
                let (x, y) = gather(step, &mut t)?;
                let mut mark = Instant::now();
                let logits = joint.forward_members(&x, true, Precision::F32)?;
                let (n, classes) = (y.size()[1], logits.size()[2]);
                let loss = logits
                    .f_reshape([-1, classes])?
                    .f_cross_entropy_loss::<Tensor>(
                        &y.f_reshape([-1])?,
                        None,
                        Reduction::None,
                        -100,
                        0.0,
                    )?
                    .f_reshape([k as i64, n])?
                    .f_mean_dim([1i64].as_slice(), false, Kind::Float)?
                    .f_sum(Kind::Float)?;
                lap(device, &mut t.forward, &mut mark);
                let grads = Tensor::f_run_backward(&[&loss], &joint.trainable(), false, false)?;
                lap(device, &mut t.backward, &mut mark);
                sgd.step(&grads, 0.01)?;
                lap(device, &mut t.optimizer, &mut mark);
            }
        }
    }
    Ok(t)
}

fn json_number(v: Option<f64>) -> String {
    v.map_or_else(|| "null".into(), |v| format!("{v:.3}"))
}

/// The fields that name a measurement, for its JSON line (written by hand:
/// the strings are preset names and modes, which need no escaping).
fn json_key(args: &Args, mode: Mode, repeat: usize) -> String {
    format!(
        "\"arch\":{:?},\"k\":{},\"batch\":{},\"steps\":{},\"device\":{:?},\"threads\":{},\
         \"mode\":{:?},\"kernels\":{:?},\"repeat\":{repeat}",
        args.arch,
        args.k,
        args.batch,
        args.steps,
        args.device,
        tch::get_num_threads(),
        mode.name(),
        mode.kernels(),
    )
}

/// The training subset of `steps * batch` samples on `device`, and the
/// warm-up's first `warmup_steps * batch` of them (none without a warm-up).
fn load(args: &Args, device: Device) -> Result<(DeviceSet, Option<DeviceSet>)> {
    let samples = args.steps * args.batch;
    let spec = DataSpec {
        train_subset: Some(samples),
        test_subset: Some(1),
        ..DataSpec::fashion_mnist()
    };
    let splits = data::load_local(&spec).context("loading Fashion-MNIST (NT_FASHION_MNIST)")?;
    if splits.train.len() < samples {
        bail!(
            "{} steps of {} need {samples} training samples; Fashion-MNIST has {}",
            args.steps,
            args.batch,
            splits.train.len()
        );
    }
    let norm = normalization(&splits.train);
    let set = DeviceSet::new(&splits.train, &norm, device)?;
    let warm_n = (args.warmup_steps * args.batch).min(samples);
    let warm = if warm_n == 0 {
        None
    } else {
        let first: Vec<usize> = (0..warm_n).collect();
        Some(DeviceSet::new(&splits.train.select(&first), &norm, device)?)
    };
    Ok((set, warm))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let arch = fusion::arch::resolve(&args.arch)?;
    if args.print_arch {
        println!("{}", arch.spec().to_json());
        return Ok(());
    }
    if args.k < 2 || args.batch == 0 || args.steps == 0 {
        bail!("need --k of at least 2 and positive --batch and --steps");
    }
    // Loads libtorch's CUDA half first: this binary is linked "as needed".
    let device = nt_runtime::device::parse_device(&args.device)?;
    if let Some(n) = args.threads {
        tch::set_num_threads(n as i32);
    }
    let kernels = match (args.kernels, device.is_cuda()) {
        (KernelChoice::Auto, true) => vec![Kernels::Batched],
        (KernelChoice::Auto, false) | (KernelChoice::Both, _) => {
            vec![Kernels::PerMember, Kernels::Batched]
        }
        (KernelChoice::Batched, _) => vec![Kernels::Batched],
        (KernelChoice::PerMember, _) => vec![Kernels::PerMember],
    };
    let mut modes: Vec<Mode> = kernels.into_iter().map(Mode::Joint).collect();
    if !args.no_sequential {
        modes.insert(0, Mode::Sequential);
    }
    let (set, warm) = load(&args, device)?;
    if let Some(warm) = &warm {
        for &mode in &modes {
            if args.profile {
                profile(mode, &arch, args.k, args.batch, warm)?;
            } else {
                run(mode, &arch, args.k, args.batch, warm)?;
            }
        }
    }

    let total = (args.k * set.len) as f64;
    for repeat in 0..args.repeats {
        let mut order = modes.clone();
        if (repeat % 2 == 1) != args.reverse {
            order.reverse();
        }
        for mode in order {
            let key = json_key(&args, mode, repeat);
            if args.profile {
                let p = profile(mode, &arch, args.k, args.batch, &set)?;
                // Milliseconds per member-step: comparable across modes.
                let ms = 1e3 / (args.k * args.steps) as f64;
                println!(
                    "{{{key},\"ms_per_member_step\":{{\"data\":{:.3},\"forward\":{:.3},\
                     \"backward\":{:.3},\"optimizer\":{:.3},\"total\":{:.3}}}}}",
                    p.data * ms,
                    p.forward * ms,
                    p.backward * ms,
                    p.optimizer * ms,
                    (p.data + p.forward + p.backward + p.optimizer) * ms,
                );
            } else {
                let m = run(mode, &arch, args.k, args.batch, &set)?;
                println!(
                    "{{{key},\"samples\":{total},\"seconds\":{:.6},\"samples_per_second\":{:.3},\
                     \"inner_samples_per_second\":{:.3},\"train_loss\":{:.9},\"own_cores\":{},\
                     \"foreign_cores\":{}}}",
                    m.seconds,
                    total / m.seconds,
                    m.inner_samples_per_second,
                    m.train_loss,
                    json_number(m.own_cores),
                    json_number(m.foreign_cores),
                );
            }
        }
    }
    Ok(())
}
