//! Image folders in torchvision's `ImageFolder` layout: one sub-folder of
//! JPEG and PNG images per class, classes in sorted order, samples ordered
//! by class and then by file name. Each image is decoded once, resized so it
//! covers the architecture's input (the shorter side for a square input, as
//! torchvision's `Resize(size)`), centre-cropped (`CenterCrop`) and
//! converted to the input's channel count (PIL's luma weights for grey).

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use image::imageops::{self, FilterType};
use image::{DynamicImage, GrayImage, ImageBuffer, Pixel, RgbImage};

use super::{FileSource, Listed};
use crate::{Result, RuntimeError};

/// File name extensions read as images (case-insensitive); other files are ignored.
pub const IMAGE_EXTENSIONS: [&str; 3] = ["png", "jpg", "jpeg"];

/// The resampling filter, part of the decoded cache's key.
pub const RESIZE_FILTER: &str = "triangle";

/// One split of an image folder: class names and files in sample order.
#[derive(Clone, Debug, Default)]
pub struct SplitListing {
    /// The folder the split's classes are in (`train/`, `test/` or the root).
    pub prefix: String,
    pub classes: Vec<String>,
    /// Each image with its label (the index of its class).
    pub files: Vec<(Listed, i64)>,
}

/// An image folder's splits: `train/` and `test/`, or classes at the root
/// (then there is no test split).
#[derive(Clone, Debug)]
pub struct FolderListing {
    pub train: SplitListing,
    pub test: Option<SplitListing>,
}

impl FolderListing {
    /// Every image, training split first.
    pub fn images(&self) -> usize {
        self.train.files.len() + self.test.as_ref().map_or(0, |t| t.files.len())
    }
}

fn is_image(name: &str) -> bool {
    name.rsplit_once('.').is_some_and(|(_, ext)| {
        IMAGE_EXTENSIONS
            .iter()
            .any(|known| ext.eq_ignore_ascii_case(known))
    })
}

/// Lists an image folder and checks its classes: none empty, and the same
/// classes in `train/` and `test/`.
pub fn list(source: &dyn FileSource) -> Result<FolderListing> {
    let all = source.list("")?;
    if all.is_empty() {
        return Err(RuntimeError::Data(format!(
            "{}: does not exist or is empty",
            source.describe()
        )));
    }
    let has = |prefix: &str| all.iter().any(|e| e.name.starts_with(prefix));
    let (train, test) = if has("train/") {
        let test = has("test/")
            .then(|| split(source, &all, "test/"))
            .transpose()?;
        (split(source, &all, "train/")?, test)
    } else {
        (split(source, &all, "")?, None)
    };
    if train.classes.is_empty() {
        return Err(RuntimeError::Data(format!(
            "{}: no class folders: expected train/<class>/<image> and test/<class>/<image> \
             (or <class>/<image> with data.test_split)",
            source.describe()
        )));
    }
    if let Some(test) = &test {
        if test.classes != train.classes {
            let only = |a: &[String], b: &[String]| -> Vec<String> {
                a.iter().filter(|c| !b.contains(c)).cloned().collect()
            };
            return Err(RuntimeError::Data(format!(
                "{}: the classes of train/ and test/ differ (only in train/: {:?}; only in test/: {:?})",
                source.describe(),
                only(&train.classes, &test.classes),
                only(&test.classes, &train.classes),
            )));
        }
    }
    Ok(FolderListing { train, test })
}

/// The classes under `prefix` (its sub-folders) and their images.
fn split(source: &dyn FileSource, all: &[Listed], prefix: &str) -> Result<SplitListing> {
    let mut classes: BTreeMap<&str, Vec<&Listed>> = BTreeMap::new();
    for entry in all {
        let Some(rest) = entry.name.strip_prefix(prefix) else {
            continue;
        };
        let (class, tail) = match rest.split_once('/') {
            Some((class, tail)) => (class, tail),
            // A folder with nothing in it still names a class; a file
            // beside the class folders is not an image of any class.
            None if entry.is_dir => (rest, ""),
            None => continue,
        };
        if prefix.is_empty() && matches!(class, "train" | "test") {
            continue;
        }
        let images = classes.entry(class).or_default();
        if !entry.is_dir && is_image(tail) {
            images.push(entry);
        }
    }
    let mut listing = SplitListing {
        prefix: prefix.to_string(),
        ..Default::default()
    };
    for (label, (class, mut images)) in classes.into_iter().enumerate() {
        if images.is_empty() {
            return Err(RuntimeError::Data(format!(
                "{}/{prefix}{class}: the class folder holds no JPEG or PNG images",
                source.describe()
            )));
        }
        images.sort_by(|a, b| a.name.cmp(&b.name));
        listing.classes.push(class.to_string());
        listing
            .files
            .extend(images.into_iter().map(|e| (e.clone(), label as i64)));
    }
    Ok(listing)
}

/// A split's pixels `[n, c, h, w]` and labels, and the files skipped.
#[derive(Debug, Default)]
pub struct Decoded {
    pub images: Vec<u8>,
    pub labels: Vec<i64>,
    /// Files that could not be decoded (with `skip_bad`), with the reason.
    pub skipped: Vec<String>,
}

/// Decodes `files` into `shape` (`[c, h, w]`, c = 1 or 3) on `threads`
/// threads. An undecodable image is an error naming it, or with
/// `skip_bad` is left out and listed; a failing read is an error either way.
pub fn decode(
    source: &dyn FileSource,
    files: &[(Listed, i64)],
    shape: [usize; 3],
    skip_bad: bool,
    threads: usize,
) -> Result<Decoded> {
    let sample: usize = shape.iter().product();
    let mut images = vec![0u8; files.len() * sample];
    let mut failed: Vec<Option<String>> = vec![None; files.len()];
    let read_error: Mutex<Option<RuntimeError>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    {
        let work = Mutex::new(
            images
                .chunks_exact_mut(sample.max(1))
                .zip(failed.iter_mut())
                .enumerate(),
        );
        std::thread::scope(|scope| {
            for _ in 0..threads.clamp(1, files.len().max(1)) {
                scope.spawn(|| loop {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    let next = work.lock().unwrap_or_else(|p| p.into_inner()).next();
                    let Some((i, (out, failure))) = next else {
                        break;
                    };
                    let name = &files[i].0.name;
                    let bytes = match source.read(name) {
                        Ok(Some(bytes)) => bytes,
                        Ok(None) => {
                            *failure = Some("the file disappeared while reading".into());
                            if !skip_bad {
                                stop.store(true, Ordering::Relaxed);
                            }
                            continue;
                        }
                        Err(e) => {
                            *read_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                            stop.store(true, Ordering::Relaxed);
                            break;
                        }
                    };
                    // A decoder that panics on a hostile file fails that
                    // file, not the worker.
                    let decoded =
                        catch_unwind(AssertUnwindSafe(|| decode_image(&bytes, shape, out)))
                            .unwrap_or_else(|_| Err("the decoder panicked on this file".into()));
                    if let Err(why) = decoded {
                        *failure = Some(why);
                        if !skip_bad {
                            stop.store(true, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
    }
    if let Some(e) = read_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let describe = |i: usize| format!("{}/{}", source.describe(), files[i].0.name);
    if !skip_bad {
        if let Some((i, why)) = failed
            .iter()
            .enumerate()
            .find_map(|(i, f)| f.as_ref().map(|w| (i, w)))
        {
            return Err(RuntimeError::Data(format!(
                "{}: cannot decode the image ({why}); fix or remove it, or set data.skip_bad: true",
                describe(i)
            )));
        }
    }
    let mut out = Decoded::default();
    if failed.iter().all(Option::is_none) {
        out.images = images;
        out.labels = files.iter().map(|(_, label)| *label).collect();
        return Ok(out);
    }
    for (i, ((_, label), failure)) in files.iter().zip(&failed).enumerate() {
        match failure {
            Some(why) => out.skipped.push(format!("{}: {why}", describe(i))),
            None => {
                out.images
                    .extend_from_slice(&images[i * sample..(i + 1) * sample]);
                out.labels.push(*label);
            }
        }
    }
    Ok(out)
}

/// Decodes one JPEG or PNG image into `out`, `[c, h, w]` planes.
pub fn decode_image(
    bytes: &[u8],
    shape: [usize; 3],
    out: &mut [u8],
) -> std::result::Result<(), String> {
    let [c, h, w] = shape;
    let image = image::load_from_memory(bytes).map_err(|e| e.to_string())?;
    if image.width() == 0 || image.height() == 0 {
        return Err("the image has no pixels".into());
    }
    // A strip of an image (1 x 100000) would be resized to thousands of
    // times the input's area before its crop: refuse it by name instead.
    let (iw, ih) = (u64::from(image.width()), u64::from(image.height()));
    let scale_area = (h as u64 * w as u64).max(1);
    let cover = if ih * w as u64 >= iw * h as u64 {
        (w as u64) * ((w as u64 * ih) / iw.max(1))
    } else {
        (h as u64) * ((h as u64 * iw) / ih.max(1))
    };
    if cover > 64 * scale_area {
        return Err(format!(
            "its aspect ratio ({iw}x{ih}) is too extreme to resize to {w}x{h}"
        ));
    }
    let (h, w) = (h as u32, w as u32);
    match c {
        1 => {
            let grey = cover_crop(luma(image), h, w);
            out.copy_from_slice(grey.as_raw());
        }
        3 => {
            out.copy_from_slice(&rgb_planes(&cover_crop(image.to_rgb8(), h, w)));
        }
        _ => return Err(format!("images can become 1 or 3 channels, not {c}")),
    }
    Ok(())
}

/// Grey levels as PIL's `convert("L")` computes them from RGB (ITU-R 601-2
/// weights, rounded); grey images pass through.
fn luma(image: DynamicImage) -> GrayImage {
    match image {
        DynamicImage::ImageLuma8(grey) => grey,
        DynamicImage::ImageLumaA8(_)
        | DynamicImage::ImageLuma16(_)
        | DynamicImage::ImageLumaA16(_) => image.to_luma8(),
        other => {
            let rgb = other.to_rgb8();
            GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
                let [r, g, b] = rgb.get_pixel(x, y).0.map(u32::from);
                image::Luma([((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8])
            })
        }
    }
}

/// Scales `image` (keeping its aspect) to the smallest size covering
/// `h` x `w` and crops the centre, as torchvision's `Resize` and
/// `CenterCrop` do for a square input.
fn cover_crop<P: Pixel<Subpixel = u8> + 'static>(
    image: ImageBuffer<P, Vec<u8>>,
    h: u32,
    w: u32,
) -> ImageBuffer<P, Vec<u8>> {
    let (iw, ih) = image.dimensions();
    if (iw, ih) == (w, h) {
        return image;
    }
    let (nw, nh) = if u64::from(ih) * u64::from(w) >= u64::from(iw) * u64::from(h) {
        (
            w,
            ((u64::from(w) * u64::from(ih)) / u64::from(iw)).max(u64::from(h)) as u32,
        )
    } else {
        (
            ((u64::from(h) * u64::from(iw)) / u64::from(ih)).max(u64::from(w)) as u32,
            h,
        )
    };
    let resized = if (nw, nh) == (iw, ih) {
        image
    } else {
        imageops::resize(&image, nw, nh, FilterType::Triangle)
    };
    // torchvision rounds the offsets half to even (Python's round).
    let left = (f64::from(nw - w) / 2.0).round_ties_even() as u32;
    let top = (f64::from(nh - h) / 2.0).round_ties_even() as u32;
    imageops::crop_imm(&resized, left, top, w, h).to_image()
}

/// An RGB image as `[3, h, w]` planes.
pub fn rgb_planes(image: &RgbImage) -> Vec<u8> {
    let plane = (image.width() * image.height()) as usize;
    let mut out = vec![0u8; 3 * plane];
    for (i, px) in image.pixels().enumerate() {
        for c in 0..3 {
            out[c * plane + i] = px[c];
        }
    }
    out
}
