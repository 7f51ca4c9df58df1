//! Array files as NumPy and PyTorch export them: per split, `x.npy` and
//! `y.npy` in a folder named after the split, or one `<split>.safetensors`
//! holding tensors `x` and `y`. Images are `uint8`, or floats in [0, 1]
//! (stored as the nearest of the 256 levels), as `[n, h, w]` (grey),
//! `[n, c, h, w]` or `[n, h, w, c]`; labels are integers from 0.

use nt_spec::data::ArrayLayout;

use super::{FileSource, ImageSet, Listed};
use crate::{Result, RuntimeError};

/// The element types an array may hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Element {
    U8,
    I8,
    I16,
    I32,
    I64,
    U16,
    U32,
    U64,
    F32,
    F64,
}

impl Element {
    pub fn size(self) -> usize {
        match self {
            Element::U8 | Element::I8 => 1,
            Element::I16 | Element::U16 => 2,
            Element::I32 | Element::U32 | Element::F32 => 4,
            Element::I64 | Element::U64 | Element::F64 => 8,
        }
    }

    fn from_npy(descr: &str) -> Option<Self> {
        // Little-endian (`<`) or byte-sized (`|`); big-endian is refused.
        let body = descr
            .strip_prefix('<')
            .or_else(|| descr.strip_prefix('|'))?;
        Some(match body {
            "u1" => Element::U8,
            "i1" => Element::I8,
            "i2" => Element::I16,
            "i4" => Element::I32,
            "i8" => Element::I64,
            "u2" => Element::U16,
            "u4" => Element::U32,
            "u8" => Element::U64,
            "f4" => Element::F32,
            "f8" => Element::F64,
            _ => return None,
        })
    }

    fn from_safetensors(dtype: safetensors::Dtype) -> Option<Self> {
        use safetensors::Dtype as D;
        Some(match dtype {
            D::U8 => Element::U8,
            D::I8 => Element::I8,
            D::I16 => Element::I16,
            D::I32 => Element::I32,
            D::I64 => Element::I64,
            D::U16 => Element::U16,
            D::U32 => Element::U32,
            D::U64 => Element::U64,
            D::F32 => Element::F32,
            D::F64 => Element::F64,
            _ => return None,
        })
    }
}

/// An array's element type, shape and little-endian data.
#[derive(Clone, Debug)]
pub struct Array<'a> {
    pub element: Element,
    pub shape: Vec<usize>,
    pub data: &'a [u8],
}

fn bad(file: &str, what: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Data(format!("{file}: {what}"))
}

/// Parses a `.npy` file (format versions 1 to 3, C order).
pub fn parse_npy<'a>(file: &str, bytes: &'a [u8]) -> Result<Array<'a>> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err(bad(file, "not a .npy file (no \\x93NUMPY magic)"));
    }
    let (header_len, start): (usize, usize) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => {
            return Err(bad(
                file,
                format!(".npy format version {v} is not 1, 2 or 3"),
            ))
        }
    };
    let end = start
        .checked_add(header_len)
        .filter(|&e| e <= bytes.len())
        .ok_or_else(|| bad(file, "the file ends inside the .npy header"))?;
    let header = std::str::from_utf8(&bytes[start..end])
        .map_err(|_| bad(file, "the .npy header is not text"))?;
    let value = |key: &str| -> Result<&str> {
        let at = header
            .find(&format!("'{key}'"))
            .ok_or_else(|| bad(file, format!("the .npy header has no '{key}'")))?;
        let rest = header[at + key.len() + 2..].trim_start();
        Ok(rest.strip_prefix(':').unwrap_or(rest).trim_start())
    };
    let descr = value("descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split_once('\''))
        .map(|(d, _)| d)
        .ok_or_else(|| bad(file, "the .npy header's descr is not a string"))?;
    let element = Element::from_npy(descr).ok_or_else(|| {
        bad(
            file,
            format!("element type `{descr}` is not a little-endian integer or float"),
        )
    })?;
    if value("fortran_order")?.starts_with("True") {
        return Err(bad(
            file,
            "the array is in Fortran order; save it with np.ascontiguousarray",
        ));
    }
    let shape_text = value("shape")?;
    let shape_text = shape_text
        .strip_prefix('(')
        .and_then(|s| s.split_once(')'))
        .map(|(s, _)| s)
        .ok_or_else(|| bad(file, "the .npy header's shape is not a tuple"))?;
    let shape = shape_text
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .map(|d| d.parse::<usize>())
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|_| {
            bad(
                file,
                format!("the .npy shape ({shape_text}) is not a tuple of sizes"),
            )
        })?;
    let data = &bytes[end..];
    check_size(file, element, &shape, data.len())?;
    Ok(Array {
        element,
        shape,
        data,
    })
}

fn check_size(file: &str, element: Element, shape: &[usize], have: usize) -> Result<()> {
    let need = shape
        .iter()
        .try_fold(element.size(), |n, &d| n.checked_mul(d))
        .ok_or_else(|| bad(file, format!("the shape {shape:?} overflows")))?;
    if have != need {
        return Err(bad(
            file,
            format!("shape {shape:?} of {element:?} needs {need} data bytes, the file has {have}"),
        ));
    }
    Ok(())
}

/// Reads one split's images and labels, or `None` when the source has
/// neither `<split>/x.npy` nor `<split>.safetensors`.
pub fn read_split(
    source: &dyn FileSource,
    listing: &[Listed],
    split: &str,
    layout: Option<ArrayLayout>,
    input: [usize; 3],
) -> Result<Option<ImageSet>> {
    let has = |name: &str| listing.iter().any(|e| e.name == name);
    let read = |name: &str| -> Result<Vec<u8>> {
        source.read(name)?.ok_or_else(|| {
            RuntimeError::Data(format!(
                "{}/{name} disappeared while reading",
                source.describe()
            ))
        })
    };
    let file = |name: &str| format!("{}/{name}", source.describe());
    let (x_name, y_name) = (format!("{split}/x.npy"), format!("{split}/y.npy"));
    let st_name = format!("{split}.safetensors");
    let set = if has(&x_name) {
        if !has(&y_name) {
            return Err(bad(
                &file(&x_name),
                format!("has no labels beside it ({y_name})"),
            ));
        }
        let (x_bytes, y_bytes) = (read(&x_name)?, read(&y_name)?);
        let x = parse_npy(&file(&x_name), &x_bytes)?;
        let y = parse_npy(&file(&y_name), &y_bytes)?;
        to_image_set((&file(&x_name), x), (&file(&y_name), y), layout, input)?
    } else if has(&st_name) {
        let bytes = read(&st_name)?;
        let name = file(&st_name);
        let tensors = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| bad(&name, format!("not a readable safetensors file ({e})")))?;
        let array = |key: &str| -> Result<Array<'_>> {
            let view = tensors.tensor(key).map_err(|_| {
                bad(
                    &name,
                    format!("has no tensor `{key}` (it needs `x` and `y`)"),
                )
            })?;
            let element = Element::from_safetensors(view.dtype()).ok_or_else(|| {
                bad(
                    &name,
                    format!(
                        "tensor `{key}` is {:?}, not an integer or float32/64",
                        view.dtype()
                    ),
                )
            })?;
            Ok(Array {
                element,
                shape: view.shape().to_vec(),
                data: view.data(),
            })
        };
        let (x, y) = (array("x")?, array("y")?);
        to_image_set(
            (&format!("{name} tensor x"), x),
            (&format!("{name} tensor y"), y),
            layout,
            input,
        )?
    } else {
        return Ok(None);
    };
    Ok(Some(set))
}

/// Images as `[n, c, h, w]` bytes in the architecture's input shape, and labels.
fn to_image_set(
    (x_file, x): (&str, Array<'_>),
    (y_file, y): (&str, Array<'_>),
    layout: Option<ArrayLayout>,
    input: [usize; 3],
) -> Result<ImageSet> {
    let [c, h, w] = input;
    let n = *x
        .shape
        .first()
        .ok_or_else(|| bad(x_file, "is a scalar, not images"))?;
    let nchw = match (x.shape.as_slice(), layout) {
        ([_, ih, iw], None) if c == 1 && [*ih, *iw] == [h, w] => true,
        ([_, a, b, d], Some(ArrayLayout::Nchw)) if [*a, *b, *d] == [c, h, w] => true,
        ([_, a, b, d], Some(ArrayLayout::Nhwc)) if [*a, *b, *d] == [h, w, c] => false,
        ([_, a, b, d], None) if [*a, *b, *d] == [c, h, w] => true,
        ([_, a, b, d], None) if [*a, *b, *d] == [h, w, c] => false,
        (shape, _) => {
            return Err(bad(
                x_file,
                format!(
                "images of shape {shape:?} do not fit the architecture's input [{c}, {h}, {w}]: \
                     expected [n, {c}, {h}, {w}] (nchw){}{}",
                if c == 1 {
                    format!(", [n, {h}, {w}]")
                } else {
                    String::new()
                },
                format_args!(" or [n, {h}, {w}, {c}] (nhwc)"),
            ),
            ))
        }
    };
    if y.shape != [n] {
        return Err(bad(
            y_file,
            format!(
                "labels of shape {:?}, expected [{n}] (one per image)",
                y.shape
            ),
        ));
    }
    let pixels = pixels(x_file, &x)?;
    let images = if nchw {
        pixels
    } else {
        let plane = h * w;
        let mut out = vec![0u8; pixels.len()];
        for (src, dst) in pixels
            .chunks_exact(plane * c)
            .zip(out.chunks_exact_mut(plane * c))
        {
            for (p, px) in src.chunks_exact(c).enumerate() {
                for (ch, &v) in px.iter().enumerate() {
                    dst[ch * plane + p] = v;
                }
            }
        }
        out
    };
    Ok(ImageSet {
        images,
        labels: labels(y_file, &y)?,
        shape: input,
    })
}

fn elements<const N: usize>(data: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    data.chunks_exact(N).map(|c| c.try_into().unwrap_or([0; N]))
}

/// Pixels as bytes: `uint8` as they are, floats in [0, 1] scaled to 0..=255.
fn pixels(file: &str, x: &Array<'_>) -> Result<Vec<u8>> {
    let level = |i: usize, v: f64| -> Result<u8> {
        if (0.0..=1.0).contains(&v) {
            Ok((v * 255.0).round() as u8)
        } else {
            Err(bad(
                file,
                format!(
                    "pixel {i} is {v}; float images must lie in [0, 1] (or save them as uint8)"
                ),
            ))
        }
    };
    match x.element {
        Element::U8 => Ok(x.data.to_vec()),
        Element::F32 => elements::<4>(x.data)
            .enumerate()
            .map(|(i, b)| level(i, f64::from(f32::from_le_bytes(b))))
            .collect(),
        Element::F64 => elements::<8>(x.data)
            .enumerate()
            .map(|(i, b)| level(i, f64::from_le_bytes(b)))
            .collect(),
        other => Err(bad(
            file,
            format!("images are {other:?}; they must be uint8, float32 or float64"),
        )),
    }
}

/// Labels as `i64`; a negative one is an error naming its index.
fn labels(file: &str, y: &Array<'_>) -> Result<Vec<i64>> {
    let values: Vec<i128> = match y.element {
        Element::U8 => y.data.iter().map(|&v| i128::from(v)).collect(),
        Element::I8 => y.data.iter().map(|&v| i128::from(v as i8)).collect(),
        Element::I16 => elements::<2>(y.data)
            .map(|b| i16::from_le_bytes(b).into())
            .collect(),
        Element::U16 => elements::<2>(y.data)
            .map(|b| u16::from_le_bytes(b).into())
            .collect(),
        Element::I32 => elements::<4>(y.data)
            .map(|b| i32::from_le_bytes(b).into())
            .collect(),
        Element::U32 => elements::<4>(y.data)
            .map(|b| u32::from_le_bytes(b).into())
            .collect(),
        Element::I64 => elements::<8>(y.data)
            .map(|b| i64::from_le_bytes(b).into())
            .collect(),
        Element::U64 => elements::<8>(y.data)
            .map(|b| u64::from_le_bytes(b).into())
            .collect(),
        Element::F32 | Element::F64 => {
            return Err(bad(file, "labels are floats; they must be integers"))
        }
    };
    values
        .into_iter()
        .enumerate()
        .map(|(i, v)| {
            i64::try_from(v)
                .ok()
                .filter(|v| (0..i64::from(u32::MAX)).contains(v))
                .ok_or_else(|| {
                    bad(
                        file,
                        format!("label {i} is {v}; labels must be class indices from 0"),
                    )
                })
        })
        .collect()
}

/// Writes a `.npy` file (version 1, C order) of `element`s.
pub fn npy_bytes(element: Element, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let descr = match element {
        Element::U8 => "|u1",
        Element::I8 => "|i1",
        Element::I16 => "<i2",
        Element::I32 => "<i4",
        Element::I64 => "<i8",
        Element::U16 => "<u2",
        Element::U32 => "<u4",
        Element::U64 => "<u8",
        Element::F32 => "<f4",
        Element::F64 => "<f8",
    };
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // The header, with its 10 leading bytes, is padded to 64 bytes and ends in a newline.
    let total = (10 + header.len() + 1).div_ceil(64) * 64;
    header.push_str(&" ".repeat(total - 10 - header.len() - 1));
    header.push('\n');
    let mut out = Vec::with_capacity(total + data.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}
