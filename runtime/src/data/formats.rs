//! Parsers for the on-disk formats: MNIST-family IDX files (plain or gzip)
//! and CIFAR binary batches. A malformed or truncated file is an error that
//! names the file and the byte offset.

use std::io::Read;

use crate::{Result, RuntimeError};

/// Images as `u8` pixels `[n, channels, height, width]` with `i64` labels.
#[derive(Clone, Debug, Default)]
pub struct ImageSet {
    pub images: Vec<u8>,
    pub labels: Vec<i64>,
    /// `[channels, height, width]`
    pub shape: [usize; 3],
}

impl ImageSet {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    pub fn sample_len(&self) -> usize {
        self.shape.iter().product()
    }

    /// The samples at `indices`, in that order.
    pub fn select(&self, indices: &[usize]) -> ImageSet {
        let n = self.sample_len();
        let mut images = Vec::with_capacity(indices.len() * n);
        let mut labels = Vec::with_capacity(indices.len());
        for &i in indices {
            images.extend_from_slice(&self.images[i * n..(i + 1) * n]);
            labels.push(self.labels[i]);
        }
        ImageSet {
            images,
            labels,
            shape: self.shape,
        }
    }
}

fn bad(file: &str, offset: usize, what: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Data(format!("{file}: at byte {offset}: {what}"))
}

/// Decompresses gzip data (detected by its magic bytes); other data passes through.
pub fn maybe_gunzip(file: &str, bytes: Vec<u8>) -> Result<Vec<u8>> {
    if bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| bad(file, out.len(), format!("corrupt gzip data ({e})")))?;
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// Parses an IDX file of unsigned bytes: returns its dimensions and data.
pub fn parse_idx(file: &str, bytes: &[u8]) -> Result<(Vec<usize>, Vec<u8>)> {
    if bytes.len() < 4 {
        return Err(bad(
            file,
            bytes.len(),
            "file ends inside the 4-byte IDX magic number",
        ));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(bad(
            file,
            0,
            "not an IDX file (the magic number must start with two zero bytes)",
        ));
    }
    if bytes[2] != 0x08 {
        return Err(bad(
            file,
            2,
            format!(
                "IDX element type 0x{:02x} is not unsigned byte (0x08)",
                bytes[2]
            ),
        ));
    }
    let rank = bytes[3] as usize;
    if rank == 0 || rank > 4 {
        return Err(bad(
            file,
            3,
            format!("IDX rank {rank} is not between 1 and 4"),
        ));
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        return Err(bad(
            file,
            bytes.len(),
            format!("file ends inside the {rank} IDX dimensions"),
        ));
    }
    let dims: Vec<usize> = (0..rank)
        .map(|i| {
            let o = 4 + 4 * i;
            u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize
        })
        .collect();
    let count = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(file, 4, format!("IDX dimensions {dims:?} overflow")))?;
    let end = header
        .checked_add(count)
        .ok_or_else(|| bad(file, 4, format!("IDX dimensions {dims:?} overflow")))?;
    if bytes.len() < end {
        return Err(bad(
            file,
            bytes.len(),
            format!(
                "truncated: dimensions {dims:?} need {count} data bytes after the {header}-byte header, \
                 the file has {}",
                bytes.len() - header
            ),
        ));
    }
    if bytes.len() > end {
        return Err(bad(
            file,
            end,
            format!("{} unexpected bytes after the data", bytes.len() - end),
        ));
    }
    Ok((dims, bytes[header..end].to_vec()))
}

/// Pairs an IDX image file with its label file.
pub fn idx_images(
    images_file: &str,
    images: &[u8],
    labels_file: &str,
    labels: &[u8],
    transpose: bool,
) -> Result<ImageSet> {
    let (dims, pixels) = parse_idx(images_file, images)?;
    let (h, w) = match dims.as_slice() {
        [_, h, w] => (*h, *w),
        _ => {
            return Err(bad(
                images_file,
                3,
                format!("images must have 3 dimensions [n, height, width], found {dims:?}"),
            ))
        }
    };
    let (ldims, label_bytes) = parse_idx(labels_file, labels)?;
    if ldims.len() != 1 || ldims[0] != dims[0] {
        return Err(bad(
            labels_file,
            4,
            format!(
                "{} labels for {} images in {images_file}",
                ldims.first().unwrap_or(&0),
                dims[0]
            ),
        ));
    }
    let pixels = if transpose {
        // EMNIST stores images transposed.
        let mut out = vec![0u8; pixels.len()];
        for (i, img) in pixels.chunks_exact(h * w).enumerate() {
            for y in 0..h {
                for x in 0..w {
                    out[i * h * w + x * h + y] = img[y * w + x];
                }
            }
        }
        out
    } else {
        pixels
    };
    let (h, w) = if transpose { (w, h) } else { (h, w) };
    Ok(ImageSet {
        images: pixels,
        labels: label_bytes.into_iter().map(i64::from).collect(),
        shape: [1, h, w],
    })
}

/// Parses a CIFAR binary batch: records of `label_bytes` label bytes (1 for
/// CIFAR-10; 2 for CIFAR-100, coarse then fine: the fine label is used)
/// followed by 3072 pixel bytes (3x32x32, channel-major).
pub fn cifar_batch(file: &str, bytes: &[u8], label_bytes: usize) -> Result<ImageSet> {
    let record = label_bytes + 3072;
    if bytes.is_empty() || !bytes.len().is_multiple_of(record) {
        return Err(bad(
            file,
            bytes.len() - bytes.len() % record,
            format!(
                "size {} is not a whole number of {record}-byte CIFAR records (truncated or not a CIFAR batch)",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / record;
    let mut set = ImageSet {
        images: Vec::with_capacity(n * 3072),
        labels: Vec::with_capacity(n),
        shape: [3, 32, 32],
    };
    for rec in bytes.chunks_exact(record) {
        set.labels.push(i64::from(rec[label_bytes - 1]));
        set.images.extend_from_slice(&rec[label_bytes..]);
    }
    Ok(set)
}

/// Concatenates image sets of one shape.
pub fn concat(file: &str, sets: Vec<ImageSet>) -> Result<ImageSet> {
    let mut iter = sets.into_iter();
    let mut out = iter.next().unwrap_or_default();
    for s in iter {
        if s.shape != out.shape {
            return Err(RuntimeError::Data(format!(
                "{file}: batches of different shapes {:?} and {:?}",
                out.shape, s.shape
            )));
        }
        out.images.extend(s.images);
        out.labels.extend(s.labels);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut out = vec![0, 0, 8, dims.len() as u8];
        for d in dims {
            out.extend(d.to_be_bytes());
        }
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn parses_idx_and_names_offsets_of_errors() {
        let images = idx(&[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let labels = idx(&[2], &[7, 9]);
        let set = idx_images("img", &images, "lab", &labels, false).unwrap();
        assert_eq!(set.shape, [1, 2, 3]);
        assert_eq!(set.labels, [7, 9]);
        let t = idx_images("img", &images, "lab", &labels, true).unwrap();
        assert_eq!(t.shape, [1, 3, 2]);
        assert_eq!(&t.images[..6], &[1, 4, 2, 5, 3, 6]);

        let err = parse_idx("f.idx", &images[..20]).unwrap_err().to_string();
        assert!(err.contains("f.idx: at byte 20: truncated"), "{err}");
        let err = parse_idx("f.idx", &[0, 0, 0x0d, 1])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at byte 2") && err.contains("0x0d"), "{err}");
        let err = parse_idx("f.idx", &[1, 2]).unwrap_err().to_string();
        assert!(err.contains("at byte 2"), "{err}");
        let err = idx_images("img", &images, "lab", &idx(&[3], &[1, 2, 3]), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("3 labels for 2 images"), "{err}");
    }

    #[test]
    fn parses_cifar_records_and_gzip() {
        let mut bytes = vec![3u8];
        bytes.extend(std::iter::repeat_n(5u8, 3072));
        bytes.push(1);
        bytes.extend(std::iter::repeat_n(6u8, 3072));
        let set = cifar_batch("b.bin", &bytes, 1).unwrap();
        assert_eq!(set.labels, [3, 1]);
        assert_eq!(set.images[3072], 6);
        let err = cifar_batch("b.bin", &bytes[..4000], 1)
            .unwrap_err()
            .to_string();
        assert!(err.contains("b.bin: at byte 3073"), "{err}");

        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, b"hello").unwrap();
        let packed = gz.finish().unwrap();
        assert_eq!(maybe_gunzip("x", packed.clone()).unwrap(), b"hello");
        let err = maybe_gunzip("x.gz", packed[..packed.len() - 4].to_vec())
            .unwrap_err()
            .to_string();
        assert!(err.contains("x.gz") && err.contains("gzip"), "{err}");
    }
}
