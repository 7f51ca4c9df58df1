//! The user's own data: image folders (order, classes, decoding, resizing,
//! channels, bad files, the memory limit, the decoded cache) and array
//! files (npy and safetensors, layouts, bad labels), and a member trained
//! from Fashion-MNIST as PNG files equal, bit for bit, to one trained from
//! the same images as arrays.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use fusion::arch::{preset, Architecture};
use fusion::checkpoint;
use nt_runtime::data::arrays::{npy_bytes, Element};
use nt_runtime::data::export::{in_folder_order, write_arrays, write_image_folder};
use nt_runtime::data::{
    self, generate_synthetic, DataFormat, DataSpec, DirCache, ImageSet, LoadOptions, LocalDir,
    Splits, SyntheticSpec,
};
use nt_runtime::job::{run_training, JobIo, LocalFiles, Provenance, Quiet, Start, TrainJob};
use nt_runtime::train::TrainConfig;
use nt_runtime::Result;
use tch::Device;

fn synthetic(n: usize, classes: usize, shape: [usize; 3], seed: u64) -> ImageSet {
    let spec = SyntheticSpec {
        train: n,
        test: n,
        classes,
        shape,
        seed,
        noise: 0.5,
    };
    generate_synthetic(&spec, n, seed).unwrap()
}

/// `root/train/<class>/*.png` and `root/test/...` from synthetic images.
fn folder(root: &Path, classes: usize, shape: [usize; 3]) -> (ImageSet, ImageSet) {
    let train = synthetic(40, classes, shape, 1);
    let test = synthetic(12, classes, shape, 2);
    write_image_folder(&train, classes, &root.join("train"), 2).unwrap();
    write_image_folder(&test, classes, &root.join("test"), 2).unwrap();
    (train, test)
}

fn load(root: &Path, input: &[usize], cache: Option<&DirCache>) -> Result<Splits> {
    let spec = DataSpec::own(DataFormat::ImageFolder, &root.display().to_string());
    load_spec(&spec, input, cache)
}

fn load_spec(spec: &DataSpec, input: &[usize], cache: Option<&DirCache>) -> Result<Splits> {
    let options = LoadOptions {
        cache: cache.map(|c| c as &dyn data::DataCache),
        ..LoadOptions::new(input)
    };
    let source = LocalDir(spec.path.clone().unwrap().into());
    data::load_with(spec, &source, &options)
}

#[test]
fn an_image_folder_loads_in_class_then_file_order_with_sorted_class_names() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = folder(dir.path(), 3, [1, 6, 5]);
    // Files that are not images, and hidden files, are not samples.
    std::fs::write(dir.path().join("train/0/notes.txt"), "x").unwrap();
    std::fs::write(dir.path().join("train/0/.hidden.png"), "x").unwrap();
    // Nor are symbolic links: a listing never leaves the folder.
    std::os::unix::fs::symlink("/etc/hostname", dir.path().join("train/0/link.png")).unwrap();
    let s = load(dir.path(), &[1, 6, 5], None).unwrap();
    assert_eq!(s.class_names, ["0", "1", "2"]);
    assert_eq!(s.classes, 3);
    let want = in_folder_order(&train);
    assert_eq!(s.train.labels, want.labels);
    assert_eq!(s.train.images, want.images, "PNG round trip is lossless");
    assert_eq!(s.test.images, in_folder_order(&test).images);
    let report = s.loaded.unwrap();
    assert_eq!(report.images, 52);
    assert!(!report.cache_hit && report.cache_key.is_empty());
}

#[test]
fn colour_images_become_grey_with_pil_weights_and_grey_becomes_three_planes() {
    let dir = tempfile::tempdir().unwrap();
    for split in ["train", "test"] {
        std::fs::create_dir_all(dir.path().join(format!("{split}/a"))).unwrap();
        let rgb =
            image::RgbImage::from_fn(4, 4, |x, y| image::Rgb([10 * x as u8, 200, 30 * y as u8]));
        rgb.save(dir.path().join(format!("{split}/a/rgb.png")))
            .unwrap();
    }
    let grey = load(dir.path(), &[1, 4, 4], None).unwrap();
    let px = |x: u32, y: u32| -> u8 {
        let [r, g, b] = [10 * x, 200, 30 * y];
        ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8
    };
    assert_eq!(grey.train.images[0], px(0, 0));
    assert_eq!(grey.train.images[4 * 2 + 3], px(3, 2));
    let colour = load(dir.path(), &[3, 4, 4], None).unwrap();
    assert_eq!(colour.train.images[4 * 2 + 3], 30, "red plane");
    assert_eq!(colour.train.images[16 + 5], 200, "green plane");
    assert_eq!(colour.train.images[32 + 4 * 3], 90, "blue plane");
}

#[test]
fn images_are_resized_to_cover_the_input_and_centre_cropped() {
    let dir = tempfile::tempdir().unwrap();
    for split in ["train", "test"] {
        std::fs::create_dir_all(dir.path().join(format!("{split}/a"))).unwrap();
        // 8 wide, 4 high: the shorter side already fits a 4x4 input, so the
        // centre crop takes columns 2..6 unchanged.
        let wide = image::GrayImage::from_fn(8, 4, |x, y| image::Luma([(x * 10 + y) as u8]));
        wide.save(dir.path().join(format!("{split}/a/wide.png")))
            .unwrap();
        // A flat 20x20 image shrinks to a flat 4x4 one.
        let flat = image::GrayImage::from_pixel(20, 20, image::Luma([77]));
        flat.save(dir.path().join(format!("{split}/a/x-flat.png")))
            .unwrap();
    }
    let s = load(dir.path(), &[1, 4, 4], None).unwrap();
    let wide: Vec<u8> = (0..4u8)
        .flat_map(|y| (2..6u8).map(move |x| x * 10 + y))
        .collect();
    assert_eq!(&s.train.images[..16], &wide[..]);
    assert_eq!(&s.train.images[16..], &[77; 16][..]);
}

#[test]
fn jpeg_images_decode_too() {
    let dir = tempfile::tempdir().unwrap();
    for split in ["train", "test"] {
        std::fs::create_dir_all(dir.path().join(format!("{split}/a"))).unwrap();
        let flat = image::RgbImage::from_pixel(16, 16, image::Rgb([120, 120, 120]));
        flat.save(dir.path().join(format!("{split}/a/x.JPG")))
            .unwrap();
    }
    let s = load(dir.path(), &[1, 8, 8], None).unwrap();
    assert!(
        s.train.images.iter().all(|&p| p.abs_diff(120) <= 2),
        "{:?}",
        s.train.images
    );
}

#[test]
fn a_corrupt_image_is_named_or_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    folder(dir.path(), 2, [1, 4, 4]);
    let bad = dir.path().join("train/1/zz-broken.png");
    std::fs::write(&bad, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let err = load(dir.path(), &[1, 4, 4], None).unwrap_err().to_string();
    assert!(
        err.contains("train/1/zz-broken.png") && err.contains("skip_bad"),
        "{err}"
    );
    let mut spec = DataSpec::own(DataFormat::ImageFolder, &dir.path().display().to_string());
    spec.skip_bad = true;
    let s = load_spec(&spec, &[1, 4, 4], None).unwrap();
    let report = s.loaded.unwrap();
    assert_eq!(report.skipped.len(), 1);
    assert!(
        report.skipped[0].contains("zz-broken.png"),
        "{:?}",
        report.skipped
    );
    assert_eq!(s.train.len(), 40);
}

#[test]
fn empty_classes_differing_classes_and_missing_test_splits_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    folder(dir.path(), 2, [1, 4, 4]);
    std::fs::create_dir_all(dir.path().join("train/9-empty")).unwrap();
    let err = load(dir.path(), &[1, 4, 4], None).unwrap_err().to_string();
    assert!(
        err.contains("train/9-empty") && err.contains("no JPEG or PNG"),
        "{err}"
    );

    std::fs::remove_dir(dir.path().join("train/9-empty")).unwrap();
    std::fs::create_dir_all(dir.path().join("test/7")).unwrap();
    std::fs::copy(
        dir.path().join("test/0/00.png"),
        dir.path().join("test/7/a.png"),
    )
    .unwrap();
    let err = load(dir.path(), &[1, 4, 4], None).unwrap_err().to_string();
    assert!(
        err.contains("differ") && err.contains("only in test/: [\"7\"]"),
        "{err}"
    );

    std::fs::remove_dir_all(dir.path().join("test")).unwrap();
    let err = load(dir.path(), &[1, 4, 4], None).unwrap_err().to_string();
    assert!(
        err.contains("no test split") && err.contains("test_split"),
        "{err}"
    );
    let mut spec = DataSpec::own(DataFormat::ImageFolder, &dir.path().display().to_string());
    spec.test_split = 0.25;
    let s = load_spec(&spec, &[1, 4, 4], None).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (30, 10));

    let err = load(dir.path(), &[784], None).unwrap_err().to_string();
    assert!(err.contains("[channels, height, width]"), "{err}");
}

#[test]
fn the_memory_limit_is_checked_before_decoding_and_says_what_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    folder(dir.path(), 2, [1, 4, 4]);
    let spec = DataSpec::own(DataFormat::ImageFolder, &dir.path().display().to_string());
    let options = LoadOptions {
        memory_limit: 1000,
        ..LoadOptions::new(&[3, 32, 32])
    };
    let source = LocalDir(dir.path().into());
    let err = data::load_with(&spec, &source, &options)
        .unwrap_err()
        .to_string();
    // 52 images of 3x32x32 at 5 bytes a pixel.
    let need = 52.0 * 3072.0 * 5.0 / 1048576.0;
    assert!(
        err.contains(&format!("{need:.1} MiB")) && err.contains("NT_DATA_MEMORY_LIMIT"),
        "{err}"
    );
    assert_eq!(data::parse_bytes("2GiB"), Some(2 << 30));
    assert_eq!(data::parse_bytes("512M"), Some(512 << 20));
    assert_eq!(data::parse_bytes("12 parsecs"), None);
}

#[test]
fn the_decoded_cache_is_reused_and_follows_changes_to_the_files_and_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = DirCache(cache_dir.path().into());
    folder(dir.path(), 3, [3, 6, 6]);
    let first = load(dir.path(), &[3, 6, 6], Some(&cache)).unwrap();
    let r1 = first.loaded.clone().unwrap();
    assert!(!r1.cache_hit && r1.cache_key.ends_with(".safetensors"));
    assert!(Path::new(&r1.cache_key).exists());

    let second = load(dir.path(), &[3, 6, 6], Some(&cache)).unwrap();
    let r2 = second.loaded.clone().unwrap();
    assert!(r2.cache_hit, "{r2:?}");
    assert_eq!(r2.cache_key, r1.cache_key);
    assert_eq!(second.train.images, first.train.images);
    assert_eq!(second.test.labels, first.test.labels);
    assert_eq!(second.class_names, first.class_names);

    // Another input size is another entry.
    let small = load(dir.path(), &[1, 4, 4], Some(&cache)).unwrap();
    assert!(!small.loaded.unwrap().cache_hit);
    // A file added is another listing.
    std::fs::copy(
        dir.path().join("train/0/00.png"),
        dir.path().join("train/0/zz.png"),
    )
    .unwrap();
    let changed = load(dir.path(), &[3, 6, 6], Some(&cache)).unwrap();
    assert!(!changed.loaded.as_ref().unwrap().cache_hit);
    assert_eq!(changed.train.len(), first.train.len() + 1);
    // A corrupt entry is decoded again and replaced.
    let key = changed.loaded.unwrap().cache_key;
    std::fs::write(&key, b"garbage").unwrap();
    let again = load(dir.path(), &[3, 6, 6], Some(&cache)).unwrap();
    assert!(!again.loaded.unwrap().cache_hit);
    assert!(
        load(dir.path(), &[3, 6, 6], Some(&cache))
            .unwrap()
            .loaded
            .unwrap()
            .cache_hit
    );
}

fn arrays_spec(root: &Path) -> DataSpec {
    DataSpec::own(DataFormat::Arrays, &root.display().to_string())
}

fn write(path: &Path, bytes: Vec<u8>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn le<T: Copy, const N: usize>(values: &[T], f: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| f(v)).collect()
}

#[test]
fn arrays_read_npy_in_every_layout_and_element_type() {
    let dir = tempfile::tempdir().unwrap();
    let set = synthetic(10, 3, [3, 4, 5], 3);
    write_arrays(&set, &dir.path().join("train")).unwrap();
    write_arrays(&set, &dir.path().join("test")).unwrap();
    let s = load_spec(&arrays_spec(dir.path()), &[3, 4, 5], None).unwrap();
    assert_eq!(s.train.images, set.images);
    assert_eq!(s.train.labels, set.labels);

    // NHWC, float32 in [0, 1], int32 labels.
    let mut nhwc = vec![0f32; set.images.len()];
    for i in 0..10 {
        for c in 0..3 {
            for p in 0..20 {
                nhwc[i * 60 + p * 3 + c] = f32::from(set.images[i * 60 + c * 20 + p]) / 255.0;
            }
        }
    }
    let labels: Vec<i32> = set.labels.iter().map(|&l| l as i32).collect();
    write(
        &dir.path().join("train/x.npy"),
        npy_bytes(Element::F32, &[10, 4, 5, 3], &le(&nhwc, f32::to_le_bytes)),
    );
    write(
        &dir.path().join("train/y.npy"),
        npy_bytes(Element::I32, &[10], &le(&labels, i32::to_le_bytes)),
    );
    let s = load_spec(&arrays_spec(dir.path()), &[3, 4, 5], None).unwrap();
    assert_eq!(
        s.train.images, set.images,
        "NHWC floats become the same bytes"
    );
    assert_eq!(s.train.labels, set.labels);

    // Grey images as [n, h, w].
    let grey = synthetic(6, 2, [1, 3, 3], 4);
    write(
        &dir.path().join("g/train/x.npy"),
        npy_bytes(Element::U8, &[6, 3, 3], &grey.images),
    );
    write(
        &dir.path().join("g/train/y.npy"),
        npy_bytes(Element::I64, &[6], &le(&grey.labels, i64::to_le_bytes)),
    );
    let mut spec = arrays_spec(&dir.path().join("g"));
    spec.test_split = 0.5;
    let s = load_spec(&spec, &[1, 3, 3], None).unwrap();
    assert_eq!((s.train.len(), s.test.len()), (3, 3));
}

#[test]
fn arrays_read_one_safetensors_file_per_split() {
    use safetensors::tensor::TensorView;
    let dir = tempfile::tempdir().unwrap();
    let set = synthetic(8, 2, [1, 2, 2], 5);
    let labels = le(&set.labels, i64::to_le_bytes);
    for split in ["train", "test"] {
        let views = [
            (
                "x",
                TensorView::new(safetensors::Dtype::U8, vec![8, 1, 2, 2], &set.images).unwrap(),
            ),
            (
                "y",
                TensorView::new(safetensors::Dtype::I64, vec![8], &labels).unwrap(),
            ),
        ];
        let bytes = safetensors::tensor::serialize(views, None).unwrap();
        write(&dir.path().join(format!("{split}.safetensors")), bytes);
    }
    let s = load_spec(&arrays_spec(dir.path()), &[1, 2, 2], None).unwrap();
    assert_eq!(s.test.images, set.images);
    assert_eq!(s.test.labels, set.labels);
}

#[test]
fn bad_arrays_are_errors_naming_file_and_cause() {
    let dir = tempfile::tempdir().unwrap();
    let x = dir.path().join("train/x.npy");
    let y = dir.path().join("train/y.npy");
    let images = vec![1u8; 4 * 4];
    write(&x, npy_bytes(Element::U8, &[4, 1, 2, 2], &images));
    write(
        &y,
        npy_bytes(Element::I64, &[4], &le(&[0i64, 1, -1, 2], i64::to_le_bytes)),
    );
    let mut spec = arrays_spec(dir.path());
    spec.test_split = 0.5;
    let err =
        |spec: &DataSpec, input: &[usize]| load_spec(spec, input, None).unwrap_err().to_string();
    let e = err(&spec, &[1, 2, 2]);
    assert!(e.contains("y.npy") && e.contains("label 2 is -1"), "{e}");

    write(
        &y,
        npy_bytes(Element::I64, &[3], &le(&[0i64, 1, 1], i64::to_le_bytes)),
    );
    let e = err(&spec, &[1, 2, 2]);
    assert!(e.contains("y.npy") && e.contains("expected [4]"), "{e}");

    write(
        &y,
        npy_bytes(Element::I64, &[4], &le(&[0i64, 1, 1, 0], i64::to_le_bytes)),
    );
    let e = err(&spec, &[1, 3, 3]);
    assert!(
        e.contains("x.npy") && e.contains("[4, 1, 2, 2]") && e.contains("[1, 3, 3]"),
        "{e}"
    );

    let floats = le(&[0.5f32, 1.5, 0.0, 0.0], f32::to_le_bytes);
    write(&x, npy_bytes(Element::F32, &[1, 1, 2, 2], &floats));
    write(
        &y,
        npy_bytes(Element::I64, &[1], &le(&[0i64], i64::to_le_bytes)),
    );
    spec.test_split = 0.0;
    std::fs::create_dir_all(dir.path().join("test")).unwrap();
    std::fs::copy(&x, dir.path().join("test/x.npy")).unwrap();
    std::fs::copy(&y, dir.path().join("test/y.npy")).unwrap();
    let e = err(&spec, &[1, 2, 2]);
    assert!(e.contains("pixel 1 is 1.5"), "{e}");

    let mut truncated = npy_bytes(Element::U8, &[4, 1, 2, 2], &images);
    truncated.truncate(truncated.len() - 3);
    write(&x, truncated);
    let e = err(&spec, &[1, 2, 2]);
    assert!(
        e.contains("x.npy") && e.contains("needs 16 data bytes, the file has 13"),
        "{e}"
    );

    let mut fortran = npy_bytes(Element::U8, &[1, 1, 2, 2], &[0; 4]);
    let at = fortran.windows(5).position(|w| w == b"False").unwrap();
    fortran.splice(at..at + 5, *b"True ");
    write(&x, fortran);
    let e = err(&spec, &[1, 2, 2]);
    assert!(e.contains("Fortran order"), "{e}");

    std::fs::remove_file(&x).unwrap();
    let e = err(&spec, &[1, 2, 2]);
    assert!(e.contains("no training arrays"), "{e}");
}

/// Local files, with no decoded cache (the test leaves the user's alone).
struct Files;

impl JobIo for Files {
    fn read(&self, key: &str) -> Result<Vec<u8>> {
        LocalFiles.read(key)
    }
    fn write(&self, key: &str, bytes: Vec<u8>) -> Result<()> {
        LocalFiles.write(key, bytes)
    }
    fn data_source(&self, spec: &DataSpec) -> Result<Box<dyn data::FileSource + '_>> {
        LocalFiles.data_source(spec)
    }
}

#[test]
fn a_member_trained_from_png_files_equals_one_trained_from_the_same_arrays() {
    let dir = tempfile::tempdir().unwrap();
    let mut fashion = DataSpec::fashion_mnist();
    fashion.train_subset = Some(1200);
    fashion.test_subset = Some(300);
    let fm = data::load_local(&fashion).unwrap();
    let folder = dir.path().join("folder");
    let arrays = dir.path().join("arrays");
    write_image_folder(&fm.train, 10, &folder.join("train"), 2).unwrap();
    write_image_folder(&fm.test, 10, &folder.join("test"), 2).unwrap();
    write_arrays(&in_folder_order(&fm.train), &arrays.join("train")).unwrap();
    write_arrays(&in_folder_order(&fm.test), &arrays.join("test")).unwrap();

    let arch = Architecture::new(preset("mlp:hidden=64,depth=2").unwrap()).unwrap();
    let train = |spec: DataSpec, out: &Path| {
        let job = TrainJob {
            start: Start::Fresh(arch.clone()),
            teachers: Vec::new(),
            config: TrainConfig {
                epochs: 1,
                batch_size: 64,
                lr: 0.05,
                seed: 7,
                ..TrainConfig::default()
            },
            data: spec,
            device: Device::Cpu,
            eval_batch: 512,
            resume: None,
            epoch_states: None,
            output: out.display().to_string(),
            provenance: Provenance::Run { run: "r".into() },
        };
        run_training(&job, &Files, &mut Quiet).unwrap()
    };
    let a = train(
        DataSpec::own(DataFormat::ImageFolder, &folder.display().to_string()),
        &dir.path().join("a.safetensors"),
    );
    let b = train(
        DataSpec::own(DataFormat::Arrays, &arrays.display().to_string()),
        &dir.path().join("b.safetensors"),
    );
    assert_eq!(a.data.as_ref().unwrap().images, 1500);
    assert_eq!(a.after.accuracy, b.after.accuracy);
    let load = |p: &str| checkpoint::load_bytes(p, std::fs::read(p).unwrap()).unwrap();
    let (sa, sb) = (load(&a.key), load(&b.key));
    assert!(!sa.tensors.is_empty());
    for (name, t) in &sa.tensors {
        assert_eq!(t.bytes(), sb.get(name).unwrap().bytes(), "{name}");
    }
    assert_eq!(sa.input().unwrap().mean, sb.input().unwrap().mean);
}
