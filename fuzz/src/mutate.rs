//! Mutations: bytes (flips, inserts, deletes, splices, interesting integers),
//! text tokens (numbers, YAML and preset punctuation, field names, nesting),
//! and run-spec fields set to extreme values. Deterministic from a seed, so
//! a test replays exactly the cases it ran before.

use nt_proto::v1 as pb;

/// A small deterministic generator (splitmix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// Integers at the edges: as little-endian bytes of 1, 2, 4 or 8 bytes.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    7,
    8,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    100_000_000,
    100_000_001,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    u64::MAX,
    u64::MAX - 7,
];

/// Numbers as a person (or an attacker) would type them.
const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "65",
    "257",
    ".nan",
    ".inf",
    "-.inf",
    "NaN",
    "inf",
    "1e308",
    "1e309",
    "-1e-320",
    "4294967295",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999",
    "100000000000",
    "0x10",
    "1_000",
    "0.0",
    "-0",
];

/// Tokens of YAML, JSON, preset strings and run specs.
const TOKENS: &[&str] = &[
    ": ",
    "- ",
    "? ",
    "[",
    "]",
    "{",
    "}",
    ",",
    "\n",
    "\n  ",
    "\n- ",
    "&a ",
    "*a",
    "<<: *a",
    "!!str ",
    "!!binary ",
    "'",
    "\"",
    "''",
    "\\u0000",
    "# ",
    "---\n",
    "...\n",
    "~",
    "null",
    "true",
    "|\n  ",
    ">-\n  ",
    "=",
    ":",
    "x",
    "mlp",
    "lenet",
    "lenet-cifar",
    "vgg11",
    "vgg11-bn",
    "resnet18",
    "resnet",
    "hidden=",
    "depth=",
    "classes=",
    "input=",
    "bias=",
    "width=",
    "blocks=",
    "channels=",
    "size=",
    "stem=",
    "2-2-2-2",
    "1x28x28",
    "3x32x32",
    "synthetic:",
    "train=",
    "test=",
    "shape=",
    "noise=",
    "name",
    "data",
    "dataset",
    "path",
    "validation",
    "split_seed",
    "train_subset",
    "augment",
    "architecture",
    "preset",
    "spec",
    "file",
    "members",
    "count",
    "seeds",
    "training",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "weight_decay",
    "nesterov",
    "schedule",
    "kind",
    "step",
    "every",
    "gamma",
    "cosine",
    "min_lr",
    "multi_step",
    "milestones",
    "bf16",
    "checkpoints",
    "fusion",
    "nt",
    "nt-iterative",
    "nt-hierarchical",
    "average",
    "concat",
    "fine_tuning",
    "distill",
    "temperature",
    "weight",
    "evaluation",
    "device",
    "gpu",
    "max_attempts",
    "labels",
    "s3://b/",
    "uploads/",
    "../",
    "\"format\"",
    "\"nt.arch/v1\"",
    "\"nodes\"",
    "\"op\"",
    "\"linear\"",
    "\"conv2d\"",
    "\"relu\"",
    "\"add\"",
    "\"flatten\"",
    "\"in\"",
    "\"out\"",
    "\"input\"",
    "\"output\"",
    "\"kernel\"",
    "\"stride\"",
    "\"padding\"",
    "\"groups\"",
    "\"batch_norm\"",
    "\"max_pool2d\"",
    "\"__metadata__\"",
    "\"nt.arch\"",
    "\"dtype\"",
    "\"F32\"",
    "\"I64\"",
    "\"BF16\"",
    "\"shape\"",
    "\"data_offsets\"",
];

/// One random mutation of `data`, using `other` (another corpus entry) for splices.
pub fn mutate(rng: &mut Rng, data: &mut Vec<u8>, other: &[u8], text: bool, max_len: usize) {
    let kinds = if text { 14 } else { 9 };
    match rng.below(kinds) {
        0 if !data.is_empty() => {
            let i = rng.below(data.len());
            data[i] ^= 1 << rng.below(8);
        }
        1 if !data.is_empty() => {
            let i = rng.below(data.len());
            data[i] = rng.next_u64() as u8;
        }
        2 => {
            let i = rng.below(data.len() + 1);
            let n = 1 + rng.below(8);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            data.splice(i..i, bytes);
        }
        3 if !data.is_empty() => {
            let i = rng.below(data.len());
            let n = 1 + rng.below((data.len() - i).min(32));
            data.drain(i..i + n);
        }
        4 => {
            let value = *rng.pick(INTERESTING);
            let width = *rng.pick(&[1usize, 2, 4, 8]);
            let bytes = value.to_le_bytes();
            let i = rng.below(data.len() + 1);
            let end = (i + width).min(data.len());
            data.splice(i..end, bytes[..width].iter().copied());
        }
        5 if !other.is_empty() => {
            // Splice: our prefix, their suffix.
            let i = rng.below(data.len() + 1);
            let j = rng.below(other.len());
            data.truncate(i);
            data.extend_from_slice(&other[j..]);
        }
        6 if !data.is_empty() => {
            // Duplicate a range (repetition grows nesting and lists).
            let i = rng.below(data.len());
            let n = 1 + rng.below((data.len() - i).min(64));
            let chunk = data[i..i + n].to_vec();
            let most = if rng.below(8) == 0 { 256 } else { 4 };
            let times = 1 + rng.below(most);
            for _ in 0..times {
                data.splice(i..i, chunk.iter().copied());
            }
        }
        7 if !data.is_empty() => {
            // A protobuf varint or a little-endian length at a random place.
            let i = rng.below(data.len());
            data.splice(i..i, varint(*rng.pick(INTERESTING)));
        }
        8 if data.len() > 8 => {
            // Truncate (a short read, a cut upload).
            let n = rng.below(data.len());
            data.truncate(n);
        }
        9 => replace_number(rng, data),
        10 | 11 => {
            let i = token_boundary(rng, data);
            data.splice(i..i, rng.pick(TOKENS).bytes());
        }
        12 => {
            let i = token_boundary(rng, data);
            data.splice(i..i, rng.pick(NUMBERS).bytes());
        }
        13 => mutate_line(rng, data),
        _ => {
            let i = rng.below(data.len() + 1);
            data.insert(i, rng.next_u64() as u8);
        }
    }
    data.truncate(max_len);
}

fn varint(mut v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
    out
}

/// A place just before or after a separator, so tokens land between words.
fn token_boundary(rng: &mut Rng, data: &[u8]) -> usize {
    let cuts: Vec<usize> = data
        .iter()
        .enumerate()
        .filter(|(_, b)| b" \n,:=[]{}".contains(b))
        .map(|(i, _)| i + 1)
        .collect();
    if cuts.is_empty() || rng.below(4) == 0 {
        rng.below(data.len() + 1)
    } else {
        *rng.pick(&cuts)
    }
}

/// Replaces a run of digits (with its sign, dot and exponent) by a number from [`NUMBERS`].
fn replace_number(rng: &mut Rng, data: &mut Vec<u8>) {
    let starts: Vec<usize> = (0..data.len())
        .filter(|&i| data[i].is_ascii_digit() && (i == 0 || !data[i - 1].is_ascii_digit()))
        .collect();
    if starts.is_empty() {
        return;
    }
    let start = *rng.pick(&starts);
    let end = (start..data.len())
        .find(|&i| !(data[i].is_ascii_digit() || b".eE+-_".contains(&data[i])))
        .unwrap_or(data.len());
    data.splice(start..end, rng.pick(NUMBERS).bytes());
}

/// Deletes, duplicates or swaps lines.
fn mutate_line(rng: &mut Rng, data: &mut Vec<u8>) {
    let mut lines: Vec<Vec<u8>> = data.split(|&b| b == b'\n').map(<[u8]>::to_vec).collect();
    let i = rng.below(lines.len());
    let j = rng.below(lines.len());
    match rng.below(3) {
        0 if lines.len() > 1 => {
            lines.remove(i);
        }
        1 => {
            let line = lines[i].clone();
            lines.insert(j, line);
        }
        _ => lines.swap(i, j),
    }
    *data = lines.join(&b'\n');
}

/// Floats at the edges, for the run spec's real fields.
const FLOATS: &[f64] = &[
    f64::NAN,
    f64::INFINITY,
    f64::NEG_INFINITY,
    0.0,
    -0.0,
    -1.0,
    f64::MIN_POSITIVE,
    5e-324,
    1.0,
    1e308,
    f64::MAX,
];

const U32S: &[u32] = &[0, 1, 2, 64, 65, 1_000_000, u32::MAX];
const U64S: &[u64] = &[0, 1, 1 << 32, 100_000_000_000, u64::MAX];

/// A string chosen by `pick`: empty, path tricks, control characters, or long.
fn string(pick: u64) -> String {
    match pick % 8 {
        0 => String::new(),
        1 => "../../etc/passwd".into(),
        2 => "s3://other-bucket/x.safetensors".into(),
        3 => "a\u{0}b\u{202e}c\n".into(),
        4 => "x".repeat(257),
        5 => "é".repeat(2048),
        6 => "y".repeat(1 << 20),
        _ => "uploads/m0.safetensors".into(),
    }
}

/// Sets one of the run spec's fields (chosen by `field`) to an extreme value
/// (chosen by `pick`). Every field a client controls is reachable.
pub fn set_extreme(spec: &mut pb::RunSpec, field: u32, pick: u64) {
    let f = FLOATS[(pick % FLOATS.len() as u64) as usize];
    let u = U32S[(pick % U32S.len() as u64) as usize];
    let w = U64S[(pick % U64S.len() as u64) as usize];
    let s = string(pick);
    fn data(spec: &mut pb::RunSpec) -> &mut pb::DataSpec {
        spec.data.get_or_insert_with(Default::default)
    }
    fn members(spec: &mut pb::RunSpec) -> &mut pb::Members {
        spec.members.get_or_insert_with(Default::default)
    }
    fn training(spec: &mut pb::RunSpec, pick: u64) -> &mut pb::Training {
        if pick.is_multiple_of(2) {
            members(spec).training.get_or_insert_with(Default::default)
        } else {
            spec.fine_tuning
                .get_or_insert_with(Default::default)
                .training
                .get_or_insert_with(Default::default)
        }
    }
    use pb::schedule::Kind;
    match field % 32 {
        0 => spec.name = s,
        1 => data(spec).dataset = s,
        2 => data(spec).path = s,
        3 => data(spec).validation = f,
        4 => data(spec).train_subset = Some(w),
        5 => data(spec).test_subset = Some(w),
        6 => {
            data(spec).dataset = "synthetic".into();
            let syn = data(spec).synthetic.get_or_insert_with(Default::default);
            match pick % 5 {
                0 => syn.train = w,
                1 => syn.test = w,
                2 => syn.classes = u,
                3 => syn.shape = vec![u; 1 + (pick as usize / 5) % 4],
                _ => syn.noise = Some(f),
            }
        }
        7 => {
            data(spec).augment = Some(pb::Augmentation {
                crop_padding: u,
                hflip: true,
            })
        }
        8 => {
            spec.architecture = Some(pb::Architecture {
                kind: Some(pb::architecture::Kind::Preset(s)),
            })
        }
        9 => {
            let preset = format!("mlp:hidden={w},depth={}", u.max(1));
            spec.architecture = Some(pb::Architecture {
                kind: Some(pb::architecture::Kind::Preset(preset)),
            })
        }
        10 => {
            spec.architecture = Some(pb::Architecture {
                kind: Some(pb::architecture::Kind::SpecJson(s)),
            })
        }
        11 => members(spec).count = u,
        12 => members(spec).seeds = vec![w; (u as usize).min(100)],
        13 => members(spec).checkpoints = vec![s; (pick as usize % 4) + 1],
        14 => training(spec, pick).epochs = Some(u),
        15 => training(spec, pick).batch_size = Some(u),
        16 => training(spec, pick).lr = Some(f),
        17 => training(spec, pick).momentum = Some(f),
        18 => training(spec, pick).weight_decay = Some(f),
        19 => {
            training(spec, pick).schedule = Some(pb::Schedule {
                kind: Some(Kind::Step(pb::StepSchedule { every: u, gamma: f })),
            })
        }
        20 => {
            let milestones = vec![u; (pick as usize % 3) + 1];
            training(spec, pick).schedule = Some(pb::Schedule {
                kind: Some(Kind::MultiStep(pb::MultiStepSchedule {
                    milestones,
                    gamma: f,
                })),
            })
        }
        21 => {
            training(spec, pick).schedule = Some(pb::Schedule {
                kind: Some(Kind::Cosine(pb::CosineSchedule { min_lr: f })),
            })
        }
        22 => training(spec, pick).schedule = Some(pb::Schedule { kind: None }),
        23 => spec.fusion = vec![(pick % 7) as i32 - 1; 1 + (pick as usize % 3)],
        24 => {
            let ft = spec.fine_tuning.get_or_insert_with(Default::default);
            ft.distill = Some(pb::Distillation {
                temperature: Some(f),
                weight: Some(FLOATS[(pick / 7 % FLOATS.len() as u64) as usize]),
            });
        }
        25 => spec.fine_tuning.get_or_insert_with(Default::default).seed = Some(w),
        26 => {
            spec.evaluation = Some(pb::Evaluation {
                batch_size: Some(u),
            })
        }
        27 => spec.device = (pick % 5) as i32 - 1,
        28 => spec.max_attempts = Some(u),
        29 => {
            spec.labels.insert(s.clone(), "v".into());
        }
        30 => {
            spec.labels.insert("k".into(), s);
        }
        _ => {
            for i in 0..(pick % 200) {
                spec.labels.insert(format!("k{i}"), "v".into());
            }
        }
    }
}
