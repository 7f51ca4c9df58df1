//! torchvision's families as specs, with torchvision's `state_dict` names:
//! ResNets of Bottleneck blocks, VGG in torchvision's layout (adaptive
//! average pooling to 7x7, a 4096-4096 classifier with dropout) and
//! MobileNetV2. A model built by torchvision with the same options loads an
//! nt checkpoint of these presets as it is.

use super::builder::{Options, SpecBuilder};
use super::spec::{ArchSpec, Op, PoolSize};
use crate::Result;

/// torchvision's `Bottleneck.expansion`.
const EXPANSION: usize = 4;

/// A ResNet stem: torchvision's (7x7 stride-2 conv and a 3x3 max pool) or
/// the CIFAR one (a 3x3 conv, no pool).
pub(super) fn stem(b: &mut SpecBuilder, channels: usize, width: usize, imagenet: bool) -> String {
    if imagenet {
        b.conv("conv1", &[], channels, width, 7, 2, 3, false);
    } else {
        b.conv("conv1", &[], channels, width, 3, 1, 1, false);
    }
    b.batch_norm("bn1", width).relu(Some("relu"));
    if imagenet {
        b.node(
            Some("maxpool"),
            &[],
            Op::MaxPool2d {
                kernel: 3,
                stride: Some(2),
                padding: 1,
            },
        );
        return "maxpool".into();
    }
    "relu".into()
}

/// The end of a ResNet block `p`: the shortcut (a strided 1x1 conv and
/// BatchNorm, `downsample.0/1`, where the shape changes), the addition of
/// the main branch's last node `main` and the shortcut, then a ReLU named
/// `{p}.out`.
#[allow(clippy::too_many_arguments)]
pub(super) fn residual(
    b: &mut SpecBuilder,
    p: &str,
    input: &str,
    main: &str,
    c_in: usize,
    c_out: usize,
    stride: usize,
) {
    let shortcut = if stride != 1 || c_in != c_out {
        b.conv(
            &format!("{p}.downsample.0"),
            &[input],
            c_in,
            c_out,
            1,
            stride,
            0,
            false,
        )
        .batch_norm(&format!("{p}.downsample.1"), c_out);
        format!("{p}.downsample.1")
    } else {
        input.to_string()
    };
    b.node(Some(&format!("{p}.add")), &[main, &shortcut], Op::Add {})
        .relu(Some(&format!("{p}.out")));
}

/// The head every ResNet shares: global average pool, flatten, `fc`.
pub(super) fn resnet_head(b: &mut SpecBuilder, features: usize, classes: usize) {
    b.node(
        Some("avgpool"),
        &[],
        Op::AdaptiveAvgPool2d {
            output: PoolSize::Square(1),
        },
    )
    .flatten()
    .linear("fc", features, classes, true);
}

/// A torchvision ResNet of Bottleneck blocks (ResNet50 is `3-4-6-3`): stage
/// i has `blocks[i]` blocks of inner width `width * 2^i` and output width
/// four times that; the stride sits on the 3x3 conv (torchvision's "v1.5").
pub fn bottleneck_resnet_spec(
    name: &str,
    blocks: &[usize],
    width: usize,
    channels: usize,
    classes: usize,
    size: usize,
    imagenet_stem: bool,
) -> ArchSpec {
    let mut b = SpecBuilder::new(name, vec![channels, size, size]);
    let mut last = stem(&mut b, channels, width, imagenet_stem);
    let mut c_in = width;
    for (stage, &count) in blocks.iter().enumerate() {
        let inner = width << stage;
        let c_out = inner * EXPANSION;
        for block in 0..count {
            let stride = if stage > 0 && block == 0 { 2 } else { 1 };
            let p = format!("layer{}.{block}", stage + 1);
            b.conv(&format!("{p}.conv1"), &[&last], c_in, inner, 1, 1, 0, false)
                .batch_norm(&format!("{p}.bn1"), inner)
                .relu(None)
                .conv(
                    &format!("{p}.conv2"),
                    &[],
                    inner,
                    inner,
                    3,
                    stride,
                    1,
                    false,
                )
                .batch_norm(&format!("{p}.bn2"), inner)
                .relu(None)
                .conv(&format!("{p}.conv3"), &[], inner, c_out, 1, 1, 0, false)
                .batch_norm(&format!("{p}.bn3"), c_out);
            residual(&mut b, &p, &last, &format!("{p}.bn3"), c_in, c_out, stride);
            last = format!("{p}.out");
            c_in = c_out;
        }
    }
    resnet_head(&mut b, c_in, classes);
    b.build()
}

/// torchvision's VGG configurations (0 = max pool).
fn vgg_config(depth: usize) -> &'static [usize] {
    match depth {
        11 => &[64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0],
        _ => &[
            64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
        ],
    }
}

/// VGG's `features.*`: a 3x3 conv of each width (with BatchNorm when asked)
/// and a ReLU, a 2x2 max pool for each 0, numbered as `nn.Sequential`
/// numbers them. Returns the channels of the last conv.
pub(super) fn vgg_features(
    b: &mut SpecBuilder,
    widths: &[usize],
    channels: usize,
    batch_norm: bool,
    bias: bool,
) -> usize {
    let (mut index, mut c_in) = (0, channels);
    for &c_out in widths {
        if c_out == 0 {
            b.max_pool(2, 2, 0);
            index += 1;
            continue;
        }
        b.conv(
            &format!("features.{index}"),
            &[],
            c_in,
            c_out,
            3,
            1,
            1,
            bias,
        );
        index += 1;
        if batch_norm {
            b.batch_norm(&format!("features.{index}"), c_out);
            index += 1;
        }
        b.relu(None);
        index += 1;
        c_in = c_out;
    }
    c_in
}

/// torchvision's VGG (11 or 16): `features.*` (3x3 convs with bias, ReLU,
/// max pools), `avgpool` (adaptive to 7x7, which repeats a smaller map), and
/// `classifier.0/3/6` with ReLU and dropout between. `width` scales the
/// convolutions (64 is torchvision's), `hidden` the classifier (4096).
#[allow(clippy::too_many_arguments)]
pub fn torchvision_vgg_spec(
    name: &str,
    depth: usize,
    batch_norm: bool,
    channels: usize,
    classes: usize,
    size: usize,
    width: usize,
    hidden: usize,
    dropout: f64,
) -> ArchSpec {
    let mut b = SpecBuilder::new(name, vec![channels, size, size]);
    let widths: Vec<usize> = vgg_config(depth).iter().map(|&m| m / 64 * width).collect();
    let c_in = vgg_features(&mut b, &widths, channels, batch_norm, true);
    b.node(
        Some("avgpool"),
        &[],
        Op::AdaptiveAvgPool2d {
            output: PoolSize::Square(7),
        },
    )
    .flatten()
    .linear("classifier.0", c_in * 49, hidden, true)
    .relu(None)
    .node(None, &[], Op::Dropout { p: dropout })
    .linear("classifier.3", hidden, hidden, true)
    .relu(None)
    .node(None, &[], Op::Dropout { p: dropout })
    .linear("classifier.6", hidden, classes, true);
    b.build()
}

/// torchvision's `_make_divisible`: `v` rounded to the nearest multiple of
/// `divisor`, never below 90 % of `v`.
fn make_divisible(v: f64, divisor: usize) -> usize {
    let d = divisor as f64;
    let mut new = ((v + d / 2.0) / d).floor().max(1.0) as usize * divisor;
    if (new as f64) < 0.9 * v {
        new += divisor;
    }
    new.max(divisor)
}

/// torchvision's MobileNetV2 inverted-residual settings: expansion t,
/// channels c, repeats n, first stride s.
const MOBILENET_V2: [(usize, usize, usize, usize); 7] = [
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
];

/// Conv, BatchNorm, ReLU6: torchvision's `Conv2dNormActivation`, a
/// sequence whose three layers are `{prefix}.0`, `.1` and `.2`.
#[allow(clippy::too_many_arguments)]
fn conv_bn_relu6(
    b: &mut SpecBuilder,
    prefix: &str,
    input: &[&str],
    c_in: usize,
    c_out: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
) {
    b.node(
        Some(&format!("{prefix}.0")),
        input,
        Op::Conv2d {
            in_channels: c_in,
            out_channels: c_out,
            kernel,
            stride,
            padding: (kernel - 1) / 2,
            bias: false,
            groups,
        },
    )
    .batch_norm(&format!("{prefix}.1"), c_out)
    .node(Some(&format!("{prefix}.2")), &[], Op::Relu6 {});
}

/// torchvision's MobileNetV2: a stride-2 stem, 17 inverted residual blocks
/// (1x1 expansion, 3x3 depthwise, linear 1x1 projection; a residual
/// addition where the stride is 1 and the widths agree), a 1x1 conv to 1280
/// channels, global average pooling, dropout and the classifier.
pub fn mobilenet_v2_spec(
    channels: usize,
    classes: usize,
    size: usize,
    width_mult: f64,
    dropout: f64,
) -> ArchSpec {
    let mut b = SpecBuilder::new("mobilenet_v2", vec![channels, size, size]);
    let mut c_in = make_divisible(32.0 * width_mult, 8);
    let last_channel = make_divisible(1280.0 * width_mult.max(1.0), 8);
    conv_bn_relu6(&mut b, "features.0", &[], channels, c_in, 3, 2, 1);
    let mut last = "features.0.2".to_string();
    let mut index = 1;
    for (t, c, n, s) in MOBILENET_V2 {
        let c_out = make_divisible(c as f64 * width_mult, 8);
        for i in 0..n {
            let stride = if i == 0 { s } else { 1 };
            let hidden = c_in * t;
            let p = format!("features.{index}.conv");
            // Without expansion the depthwise conv comes first.
            let mut layer = 0;
            if t != 1 {
                conv_bn_relu6(&mut b, &format!("{p}.0"), &[&last], c_in, hidden, 1, 1, 1);
                layer = 1;
            }
            let dw_input: &[&str] = if t != 1 { &[] } else { &[&last] };
            let dw = format!("{p}.{layer}");
            conv_bn_relu6(&mut b, &dw, dw_input, hidden, hidden, 3, stride, hidden);
            let project = format!("{p}.{}", layer + 1);
            let norm = format!("{p}.{}", layer + 2);
            b.conv(&project, &[], hidden, c_out, 1, 1, 0, false)
                .batch_norm(&norm, c_out);
            last = if stride == 1 && c_in == c_out {
                let add = format!("features.{index}.add");
                b.node(Some(&add), &[&last, &norm], Op::Add {});
                add
            } else {
                norm
            };
            c_in = c_out;
            index += 1;
        }
    }
    conv_bn_relu6(
        &mut b,
        &format!("features.{index}"),
        &[&last],
        c_in,
        last_channel,
        1,
        1,
        1,
    );
    b.node(
        Some("pool"),
        &[],
        Op::AdaptiveAvgPool2d {
            output: PoolSize::Square(1),
        },
    )
    .flatten()
    .node(None, &[], Op::Dropout { p: dropout })
    .linear("classifier.1", last_channel, classes, true);
    b.build()
}

/// `resnet34`, `resnet50` and `resnet:block=bottleneck`'s options.
pub(super) fn bottleneck_resnet(
    o: &mut Options,
    name: &str,
    blocks: Vec<usize>,
) -> Result<ArchSpec> {
    let width = o.usize("width", 64)?;
    let channels = o.usize("channels", 3)?;
    let classes = o.usize("classes", 10)?;
    let size = o.usize("size", 32)?;
    let stem = o.choice("stem", &["cifar", "imagenet"])?;
    Ok(bottleneck_resnet_spec(
        name,
        &blocks,
        width,
        channels,
        classes,
        size,
        stem == "imagenet",
    ))
}

/// `vgg11` and `vgg16` with `layout=torchvision`.
pub(super) fn vgg(o: &mut Options, name: &str, depth: usize, batch_norm: bool) -> Result<ArchSpec> {
    let channels = o.usize("channels", 3)?;
    let classes = o.usize("classes", 10)?;
    let size = o.usize("size", 32)?;
    let width = o.usize("width", 64)?;
    let hidden = o.usize("hidden", 4096)?;
    let dropout = o.fraction("dropout", 0.5)?;
    Ok(torchvision_vgg_spec(
        name, depth, batch_norm, channels, classes, size, width, hidden, dropout,
    ))
}

/// `mobilenet_v2`'s options.
pub(super) fn mobilenet_v2(o: &mut Options) -> Result<ArchSpec> {
    let channels = o.usize("channels", 3)?;
    let classes = o.usize("classes", 10)?;
    let size = o.usize("size", 32)?;
    let width_mult = o.positive("width_mult", 1.0, 16.0)?;
    let dropout = o.fraction("dropout", 0.2)?;
    Ok(mobilenet_v2_spec(
        channels, classes, size, width_mult, dropout,
    ))
}

#[cfg(test)]
mod tests {
    use crate::arch::{preset, Architecture};

    /// Parameter counts and `state_dict` lengths of torchvision 0.26's
    /// models built with `num_classes=10`.
    #[test]
    fn presets_have_torchvision_sizes() {
        for (text, parameters, entries) in [
            ("resnet34:stem=imagenet", 21_289_802, 218),
            ("resnet50:stem=imagenet", 23_528_522, 320),
            ("vgg16", 134_301_514, 32),
            ("vgg16-bn", 134_309_962, 97),
            ("vgg11:layout=torchvision", 128_807_306, 22),
            ("vgg11-bn:layout=torchvision", 128_812_810, 62),
            ("mobilenet_v2", 2_236_682, 314),
        ] {
            let a = Architecture::new(preset(text).unwrap()).unwrap();
            assert_eq!(a.parameter_count(), parameters, "{text}");
            assert_eq!(a.params().len(), entries, "{text}");
            assert_eq!(a.output_shape(), &[10], "{text}");
        }
    }

    #[test]
    fn mobilenet_v2_names_and_depthwise_shapes_follow_torchvision() {
        let a = Architecture::new(preset("mobilenet_v2").unwrap()).unwrap();
        let find = |name: &str| {
            a.params()
                .into_iter()
                .find(|p| p.name == name)
                .unwrap_or_else(|| panic!("no {name}"))
                .shape
        };
        assert_eq!(find("features.0.0.weight"), [32, 3, 3, 3]);
        assert_eq!(find("features.1.conv.0.0.weight"), [32, 1, 3, 3]);
        assert_eq!(find("features.1.conv.1.weight"), [16, 32, 1, 1]);
        assert_eq!(find("features.2.conv.1.0.weight"), [96, 1, 3, 3]);
        assert_eq!(find("features.18.0.weight"), [1280, 320, 1, 1]);
        assert_eq!(find("classifier.1.weight"), [10, 1280]);
        let half = Architecture::new(preset("mobilenet_v2:width_mult=0.5").unwrap()).unwrap();
        assert_eq!(half.output_shape(), &[10]);
    }
}
